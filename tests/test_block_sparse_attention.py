"""Block-sparse flash attention (kernels_pallas/block_sparse_attention.py) against the dense reference.

Both kernels run on CPU in the Pallas interpreter: the TPU (Mosaic) kernels under ``pltpu.InterpretParams`` and the
GPU (Triton) kernels under generic ``interpret=True``. The TPU kernels are also compiled for real TPU generations
with the Mosaic compiler from libtpu (AOT, via ``jax.experimental.topologies``).
"""

from __future__ import annotations

import functools
import os

# libtpu (loaded lazily by the AOT topology compiles below) takes a process lock by default; pytest-xdist workers
# and parallel sessions each load it, so allow several loads (only compilation happens, no TPU is opened).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks
from kernels_pallas import block_sparse_metadata as meta_lib
from kernels_pallas.block_sparse_attention import (block_sparse_attention, block_sparse_attention_reference)
from kernels_pallas.reference import reference_attention

F32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_FWD_TOL = dict(atol=2.5e-2, rtol=2.5e-2)
BF16_GRAD_TOL = dict(atol=5e-2, rtol=5e-2)
TILES = {"tpu": 128, "gpu": 64}  # TPU tiles must be multiples of 128; GPU (Triton) powers of two


def _inputs(seed, b, t, s, h, kvh, d, dtype):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kvh, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kvh, d), jnp.float32).astype(dtype)
  w = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(dtype)
  return q, k, v, w


def _packed_segments(rng, b, length, n_docs=3, pad=True):
  """Monotone document ids 1..n per row, then a tail of padding (segment 0)."""
  out = np.zeros((b, length), np.int32)
  for i in range(b):
    used = length - (int(rng.integers(1, length // 4)) if pad else 0)
    cuts = np.sort(rng.choice(np.arange(1, used), size=n_docs - 1, replace=False))
    out[i, :used] = np.searchsorted(cuts, np.arange(used), side="right") + 1
  return jnp.asarray(out)


def _value_and_vjp(fn, q, k, v, w):
  out, pullback = jax.vjp(fn, q, k, v)
  return (out,) + pullback(w)


def _run_both(backend, mask, q, k, v, w, *, block=None, seg=None, cap=None):
  block = block or TILES[backend]
  kw = dict(mask=mask, logit_soft_cap=cap)
  if seg is not None:
    kw.update(q_segment_ids=seg[0], kv_segment_ids=seg[1])
  kern = functools.partial(block_sparse_attention, backend=backend, interpret=True, block_q=block, block_kv=block,
                           **kw)
  ref = functools.partial(reference_attention, **kw)
  got = jax.jit(lambda *a: _value_and_vjp(kern, *a))(q, k, v, w)
  want = jax.jit(lambda *a: _value_and_vjp(ref, *[x.astype(jnp.float32) for x in a]))(q, k, v, w)
  return got, want


def _assert_close(got, want, dtype):
  names = ("out", "dq", "dk", "dv")
  for name, g, r in zip(names, got, want):
    g = np.asarray(g.astype(jnp.float32))
    r = np.asarray(r.astype(jnp.float32))
    assert np.all(np.isfinite(g)), f"{name} has non-finite values"
    if dtype == jnp.float32:
      tol = F32_TOL
    else:
      tol = BF16_FWD_TOL if name == "out" else BF16_GRAD_TOL
    np.testing.assert_allclose(g, r, err_msg=name, **tol)


# (id, mask, q_len, kv_len, heads, kv_heads, segments, soft cap)
CASES = [
    ("causal", masks.Causal(), 256, 256, 2, 2, False, None),
    ("block_causal_ragged", masks.BlockCausal(48), 200, 200, 2, 1, False, None),
    ("bd3_2L_mqa", masks.BD3(128, 16), 256, 256, 4, 1, False, None),
    ("tidar_softcap", masks.TiDARTrain(128, 32), 256, 256, 2, 2, False, 20.0),
    ("prefix_lm_gqa_cross_ragged", masks.PrefixLM(70), 136, 264, 4, 2, False, None),
    ("packed_causal_ragged", masks.Causal(), 232, 232, 2, 1, True, None),
]


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_f32(backend, case):
  _, mask, t, s, h, kvh, segmented, cap = case
  q, k, v, w = _inputs(hash(case[0]) % 1000, 1, t, s, h, kvh, 32, jnp.float32)
  seg = None
  if segmented:
    seg_q = _packed_segments(np.random.default_rng(0), 1, t)
    seg = (seg_q, seg_q)
  got, want = _run_both(backend, mask, q, k, v, w, seg=seg, cap=cap)
  _assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_matches_reference_bf16(backend):
  q, k, v, w = _inputs(3, 2, 256, 256, 2, 1, 64, jnp.bfloat16)
  got, want = _run_both(backend, masks.BD3(128, 16), q, k, v, w)
  assert all(x.dtype == jnp.bfloat16 for x in got)
  _assert_close(got, want, jnp.bfloat16)


def test_tpu_split_dq_pass_matches_reference(monkeypatch):
  """Where the fused dQ accumulator would not fit VMEM, dQ runs as its own pass: same results (GQA, packing)."""
  from kernels_pallas import _block_sparse_tpu
  monkeypatch.setattr(_block_sparse_tpu, "FUSED_DQ_MAX_BYTES", 0)
  q, k, v, w = _inputs(7, 1, 256, 256, 2, 1, 32, jnp.float32)
  seg = _packed_segments(np.random.default_rng(1), 1, 256)
  kern = functools.partial(block_sparse_attention, mask=masks.BD3(128, 16), q_segment_ids=seg, kv_segment_ids=seg,
                           backend="tpu", interpret=True, block_q=128, block_kv=128)
  assert "block_sparse_attention_dq_tpu" in str(jax.make_jaxpr(lambda *a: _value_and_vjp(kern, *a))(q, k, v, w))
  got, want = _run_both("tpu", masks.BD3(128, 16), q, k, v, w, seg=(seg, seg))
  _assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_fully_masked_rows_give_zero_output_and_grads(backend):
  t = 128 + 64
  q, k, v, w = _inputs(4, 1, t, t, 2, 1, 32, jnp.float32)
  dense = np.tril(np.ones((t, t), bool))
  dense[10:20] = False       # rows with no allowed key inside masked tiles
  dense[130:150] = False
  seg = jnp.asarray(np.where(np.arange(t) < 170, 1, 0)[None].astype(np.int32))  # padding rows 170.. (segment 0)
  got, want = _run_both(backend, masks.Explicit(dense), q, k, v, w, seg=(seg, seg))
  _assert_close(got, want, jnp.float32)
  out, dq = np.asarray(got[0]), np.asarray(got[1])
  for rows in (slice(10, 20), slice(130, 150), slice(170, t)):
    assert np.all(out[:, rows] == 0.0) and np.all(dq[:, rows] == 0.0)
  # Keys only seen by padding/empty rows get zero dk/dv.
  assert np.all(np.asarray(got[2])[:, 170:] == 0.0) and np.all(np.asarray(got[3])[:, 170:] == 0.0)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("mask,t,block", [(masks.Causal(), 512, None), (masks.BD3(256, 32), 512, None),
                                          (masks.BlockCausal(64), 448, None)])
def test_visits_only_nonempty_tiles(backend, mask, t, block):
  block = block or TILES[backend]
  q, k, v, _ = _inputs(5, 1, t, t, 2, 1, 32, jnp.float32)
  out, visits = block_sparse_attention(q, k, v, mask=mask, backend=backend, interpret=True, block_q=block,
                                       block_kv=block, debug_counter=True)
  classes = mask.block_classes(t, t, block_q=block, block_kv=block)
  nonempty = (classes != masks.EMPTY).sum(axis=1)
  visits = np.asarray(visits)
  assert visits.shape == (1, 2, classes.shape[0])
  np.testing.assert_array_equal(visits, np.broadcast_to(nonempty, visits.shape))
  assert visits.sum() == 2 * np.count_nonzero(classes) < 2 * classes.size  # sparsity is real
  meta = meta_lib.build_metadata(mask, t, t, block, block)
  assert meta.num_nonempty == int(meta.fwd_count.sum()) == int(meta.dkv_count.sum())  # dK/dV visits the same set
  np.testing.assert_allclose(np.asarray(out), np.asarray(block_sparse_attention_reference(q, k, v, mask=mask)),
                             **F32_TOL)


def test_metadata_layout():
  meta = meta_lib.build_metadata(masks.Causal(), 200, 200, 64, 64)
  np.testing.assert_array_equal(meta.fwd_count, [1, 2, 3, 4])
  np.testing.assert_array_equal(meta.fwd_kv_index[1], [0, 1, 1, 1])  # packed left, padding repeats the last tile
  np.testing.assert_array_equal(meta.fwd_kind[2], [meta_lib.UNMASKED, meta_lib.UNMASKED, meta_lib.MASKED, 0])
  # The ragged last query tile (rows 192..199 + padding) is always masked.
  assert np.all(meta.fwd_kind[3] == meta_lib.MASKED)
  np.testing.assert_array_equal(meta.dkv_count, [4, 3, 2, 1])
  np.testing.assert_array_equal(meta.dkv_q_index[2], [2, 3, 3, 3])
  assert meta.partial_blocks is None
  assert meta_lib.build_metadata(masks.Causal(), 200, 200, 64, 64) is meta  # cached per static shape
  table = meta_lib.build_metadata(masks.Explicit(np.tril(np.ones((100, 100), bool))), 100, 100, 32, 32)
  assert table.partial_blocks.shape == (3, 32, 32)  # diagonal, ragged off-diagonal, ragged diagonal (deduplicated)


@st.composite
def _random_block_mask(draw):
  t = draw(st.sampled_from([128, 192, 256]))
  s = draw(st.sampled_from([128, 200, 256]))
  gran = draw(st.sampled_from([16, 32, 64]))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  nq, nk = -(-t // gran), -(-s // gran)
  kinds = rng.choice(3, size=(nq, nk), p=[0.4, 0.3, 0.3])  # empty / full / partial at granularity `gran`
  dense = np.repeat(np.repeat(kinds, gran, 0), gran, 1)[:t, :s]
  noise = rng.random((t, s)) < 0.5
  arr = (dense == 1) | ((dense == 2) & noise)
  return t, s, arr, seed


@pytest.mark.parametrize("backend,examples", [("tpu", 2), ("gpu", 4)])
def test_random_block_masks(backend, examples):
  @hypothesis.settings(max_examples=examples, deadline=None, derandomize=True,
                       suppress_health_check=list(hypothesis.HealthCheck))
  @hypothesis.given(_random_block_mask())
  def check(spec):
    t, s, arr, seed = spec
    q, k, v, w = _inputs(seed % 1000, 1, t, s, 2, 1, 32, jnp.float32)
    got, want = _run_both(backend, masks.Explicit(arr), q, k, v, w)
    _assert_close(got, want, jnp.float32)

  check()


def test_random_structured_mask_composition_gpu():
  mask = (masks.BlockCausal(32) & masks.PrefixLM(0)) | masks.Explicit(np.eye(160, dtype=bool))  # table path
  q, k, v, w = _inputs(6, 1, 160, 160, 2, 2, 32, jnp.float32)
  got, want = _run_both("gpu", mask, q, k, v, w, block=32)
  _assert_close(got, want, jnp.float32)


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.mark.parametrize("kwargs,shapes,match", [
    ({}, ((1, 64, 4, 32), (1, 64, 3, 32), (1, 64, 3, 32)), "kv_heads=3 must divide heads=4"),
    ({}, ((1, 64, 4, 32), (1, 64, 2, 32), (1, 48, 2, 32)), "must have the same shape"),
    ({}, ((1, 64, 4, 32), (1, 64, 2, 16), (1, 64, 2, 16)), "head_dim"),
    ({}, ((1, 64, 4), (1, 64, 2, 32), (1, 64, 2, 32)), r"q must be \[batch, len, heads, head_dim\]"),
    ({"block_q": 100}, ((1, 256, 2, 32), (1, 256, 2, 32), (1, 256, 2, 32)), "multiple of 128"),
    ({"block_kv": 0}, ((1, 256, 2, 32), (1, 256, 2, 32), (1, 256, 2, 32)), "positive integer"),
    ({"backend": "gpu", "block_q": 48}, ((1, 256, 2, 32), (1, 256, 2, 32), (1, 256, 2, 32)), "power of two"),
    ({"backend": "cuda"}, ((1, 64, 2, 32), (1, 64, 2, 32), (1, 64, 2, 32)), "backend must be one of"),
    ({"q_segment_ids": jnp.ones((1, 64), jnp.int32)}, ((1, 64, 2, 32),) * 3, "or neither"),
    ({"q_segment_ids": jnp.ones((1, 60), jnp.int32), "kv_segment_ids": jnp.ones((1, 64), jnp.int32)},
     ((1, 64, 2, 32),) * 3, r"q_segment_ids must be \[batch, q_len\]"),
])
def test_bad_inputs_raise(kwargs, shapes, match):
  q, k, v = (jnp.zeros(s, jnp.float32) for s in shapes)
  kwargs = {"backend": "tpu", **kwargs}
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, k, v, mask=masks.Causal(), interpret=True, **kwargs)


def test_cpu_without_interpret_is_rejected():
  q = jnp.zeros((1, 64, 2, 32))
  with pytest.raises(ValueError, match="interpret=True"):
    block_sparse_attention(q, q, q, mask=masks.Causal())


# ------------------------------------------------------------------------------------------------------------------
# Real Mosaic compiles for TPU generations (AOT from this CPU host).


def _topology(name):
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu")
  except Exception as e:  # noqa: BLE001 - no libtpu on this host
    pytest.skip(f"TPU topology {name} unavailable (libtpu not installed?): {e}")


@pytest.mark.parametrize("topology,mask,t,dtype,segmented,cap", [
    ("v5e:2x2", masks.BD3(192, 16), 384, jnp.bfloat16, True, 30.0),
    ("v6e:2x2", masks.Explicit(np.tril(np.ones((300, 300), bool))), 300, jnp.float32, False, None),
    ("v5p:2x2x1", masks.TiDARTrain(256, 32), 512, jnp.bfloat16, False, None),
])
def test_tpu_compiles_forward_and_backward(topology, mask, t, dtype, segmented, cap):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  topo = _topology(topology)
  mesh = Mesh(np.array(topo.devices).reshape(-1), ("data",))
  n = len(topo.devices)
  h, kvh, d = 4, 2, 128

  def kern(q, k, v, *segs):
    kw = dict(q_segment_ids=segs[0], kv_segment_ids=segs[1]) if segs else {}
    return block_sparse_attention(q, k, v, mask=mask, backend="tpu", logit_soft_cap=cap, **kw)

  def fwd(*args):
    return jax.shard_map(kern, mesh=mesh, in_specs=(P("data"),) * len(args), out_specs=P("data"),
                         check_vma=False)(*args)

  def loss(*args):
    return jnp.sum(fwd(*args).astype(jnp.float32))

  sh = NamedSharding(mesh, P("data"))
  args = [jax.ShapeDtypeStruct((n, t, h, d), dtype, sharding=sh),
          jax.ShapeDtypeStruct((n, t, kvh, d), dtype, sharding=sh),
          jax.ShapeDtypeStruct((n, t, kvh, d), dtype, sharding=sh)]
  if segmented:
    args += [jax.ShapeDtypeStruct((n, t), jnp.int32, sharding=sh)] * 2
  fwd_text = jax.jit(fwd).lower(*args).compile().as_text()
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  assert "block_sparse_attention_fwd_tpu" in fwd_text
  bwd_text = bwd.as_text()
  # dQ is computed by the dK/dV kernel (its whole-sequence accumulator fits VMEM at these lengths).
  assert "block_sparse_attention_dkv_tpu" in bwd_text and "block_sparse_attention_dq_tpu" not in bwd_text


def test_tpu_compiles_debug_counter():
  topo = _topology("v5e:2x2")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(topo.devices).reshape(-1), ("data",))
  n = len(topo.devices)

  def kern(q, k, v):
    return block_sparse_attention(q, k, v, mask=masks.Causal(), backend="tpu", debug_counter=True)

  f = jax.shard_map(kern, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=(P("data"), P("data")),
                    check_vma=False)
  sh = NamedSharding(mesh, P("data"))
  spec = jax.ShapeDtypeStruct((n, 256, 2, 128), jnp.float32, sharding=sh)
  out, visits = jax.eval_shape(f, spec, spec, spec)
  assert out.shape == spec.shape and jnp.issubdtype(visits.dtype, jnp.integer), (out, visits)
  assert "block_sparse_attention_fwd_tpu" in jax.jit(f).lower(spec, spec, spec).compile().as_text()


@pytest.mark.parametrize("segmented", [False, True])
def test_gpu_triton_lowering_forward_and_backward(segmented):
  """The Triton kernels lower for CUDA from this host (Pallas → Triton IR; no GPU needed, no ptxas run)."""
  t = 200
  mask = masks.BD3(100, 20)

  def loss(q, k, v, *segs):
    kw = dict(q_segment_ids=segs[0], kv_segment_ids=segs[1]) if segs else {}
    return jnp.sum(block_sparse_attention(q, k, v, mask=mask, backend="gpu", **kw).astype(jnp.float32))

  args = [jax.ShapeDtypeStruct((1, t, 4, 64), jnp.bfloat16), jax.ShapeDtypeStruct((1, t, 2, 64), jnp.bfloat16),
          jax.ShapeDtypeStruct((1, t, 2, 64), jnp.bfloat16)]
  if segmented:
    args += [jax.ShapeDtypeStruct((1, t), jnp.int32)] * 2
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  for name in ("block_sparse_attention_fwd_gpu", "block_sparse_attention_dq_gpu", "block_sparse_attention_dkv_gpu"):
    assert name in text


def test_remat_policy_saves_forward_output_and_logsumexp(capsys):
  """Under the model's ``dots_no_batch`` remat the kernel's output and logsumexp are saved residuals (by checkpoint
  name), so the backward does not run the forward kernel again; the plain policy saves only q, k, v."""
  from ardiff import model
  q = jnp.ones((1, 128, 2, 64), jnp.float32)
  f = lambda q, k, v: block_sparse_attention(q, k, v, mask=masks.Causal(), backend="tpu").sum()
  jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(f, policy=model._REMAT_POLICIES["dots_no_batch"]), q, q, q)
  saved = capsys.readouterr().out
  assert "named 'block_sparse_attention_out'" in saved and "named 'block_sparse_attention_lse'" in saved, saved
  jax.ad_checkpoint.print_saved_residuals(
      jax.checkpoint(f, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable), q, q, q)
  assert "block_sparse_attention_out" not in capsys.readouterr().out


def test_tpu_default_tiles():
  """The model calls the kernels without tile sizes: long sequences get 512 tiles (1.9-3x cheaper per element than
  128 in the compiler's bundle count), short ones a single tile; each choice passes the TPU tiling check."""
  from kernels_pallas import tile_table
  from kernels_pallas.block_sparse_attention import _check_block
  assert [tile_table.tpu_default_block(n) for n in (5, 64, 128, 256, 1024, 4096, 4100)] == [8, 64, 128, 256, 512,
                                                                                             512, 512]
  for n in range(1, 2000, 37):
    _check_block("tpu", "block_q", tile_table.tpu_default_block(n), n)
