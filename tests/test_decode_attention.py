"""Decode attention (kernels_pallas/decode_attention.py) and the Pallas routing of ardiff.attention.

CPU only: the GPU (Triton) kernel runs in generic Pallas interpret mode, the TPU (Mosaic) kernel in TPU interpret
mode (``pltpu.InterpretParams``, ~100x slower: few, small cases), and the Mosaic kernels are compiled for real for
v5e and v6e topologies with libtpu (AOT, no TPU needed).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ardiff import attention as attention_lib
from ardiff import masks
from kernels_pallas import common
from kernels_pallas import decode_attention as da
from kernels_pallas.reference import reference_attention

S = 64  # cache max_len for the interpret tests


def tidar_decode_mask(n: int, k: int) -> masks.Explicit:
  """A TiDAR-style decode mask as an explicit table (docs/algorithms.md §3.4), tiled over absolute positions.

  Positions are grouped in frames of ``k`` draft rows followed by ``k`` pre-draft rows: draft rows are causal; a
  pre-draft row of frame f sees everything before the frame, the drafts of its frame up to its own block index,
  and its own pre-draft block bidirectionally.
  """
  q = np.arange(n)[:, None]
  kk = np.arange(n)[None, :]
  frame = 2 * k
  fq, fk = q // frame, kk // frame
  oq, ok = q % frame, kk % frame
  causal = kk <= q  # draft rows
  q_pre, k_pre = oq >= k, ok >= k
  earlier = fk < fq
  same = fk == fq
  pre_row = q_pre & (earlier | (same & ~k_pre & (ok <= oq - k)) | (same & k_pre))
  return masks.Explicit(np.where(q_pre, pre_row, causal))


MASKS = {
    "causal": masks.Causal(),
    "block_causal4": masks.BlockCausal(4),
    "full": masks.Full(),
    "tidar_explicit": tidar_decode_mask(S, 4),
    "bd3_and_causal": masks.BD3(n=S // 2, block_size=4) | masks.Causal(),
}


def make_inputs(*, b=3, t=8, h=4, kvh=2, d=32, s=S, lengths=None, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
  kc = jnp.asarray(rng.standard_normal((b, s, kvh, d)), dtype)
  vc = jnp.asarray(rng.standard_normal((b, s, kvh, d)), dtype)
  if lengths is None:  # ragged: an empty cache (length 0 + T), a middle one, one that ends at max_len
    lengths = [0, 17, s - t][:b]
  lengths = jnp.asarray(lengths, jnp.int32)
  return q, kc, vc, lengths, lengths + t


def reference(q, kc, vc, lengths, kv_lengths, mask, **kw):
  return reference_attention(q, kc, vc, mask=mask, q_offsets=lengths, kv_lengths=kv_lengths, **kw)


# ------------------------------------------------------------------------------------------------------------------
# decode_attention vs the dense reference.


@pytest.mark.parametrize("t", [1, 8])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_decode_gpu_kernel_interpret(mask_name, t):
  mask = MASKS[mask_name]
  q, kc, vc, lens, kvl = make_inputs(t=t)
  out = da.decode_attention(q, kc, vc, q_offsets=lens, kv_lengths=kvl, mask=mask, backend="gpu", interpret=True,
                            block_kv=16)
  np.testing.assert_allclose(out, reference(q, kc, vc, lens, kvl, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_name,t,kvh,block_kv", [
    ("causal", 8, 2, 16),
    ("block_causal4", 1, 1, 16),
    ("full", 8, 4, 32),
    ("tidar_explicit", 8, 2, None),  # table masks need lane-aligned tiles on TPU: block_kv = max_len here
    ("bd3_and_causal", 1, 2, 8),
])
def test_decode_tpu_kernel_interpret(mask_name, t, kvh, block_kv):
  mask = MASKS[mask_name]
  q, kc, vc, lens, kvl = make_inputs(t=t, kvh=kvh)
  out = da.decode_attention(q, kc, vc, q_offsets=lens, kv_lengths=kvl, mask=mask, backend="tpu", interpret=True,
                            block_kv=block_kv)
  np.testing.assert_allclose(out, reference(q, kc, vc, lens, kvl, mask), atol=1e-5, rtol=1e-5)


def test_decode_tpu_table_mask_multi_tile():
  """Explicit mask with several lane-aligned (128) tiles and ragged lengths crossing tile boundaries."""
  mask = tidar_decode_mask(384, 4)
  q, kc, vc, lens, kvl = make_inputs(b=2, t=8, h=2, kvh=1, d=32, s=384, lengths=[121, 250])
  out = da.decode_attention(q, kc, vc, q_offsets=lens, kv_lengths=kvl, mask=mask, backend="tpu", interpret=True,
                            block_kv=128)
  np.testing.assert_allclose(out, reference(q, kc, vc, lens, kvl, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_decode_soft_cap_scale_and_gqa4(backend):
  q, kc, vc, lens, kvl = make_inputs(b=2, t=4, h=8, kvh=2, lengths=[5, 40])
  kw = dict(sm_scale=0.3, logit_soft_cap=5.0)
  out = da.decode_attention(q, kc, vc, q_offsets=lens, kv_lengths=kvl, mask=masks.BlockCausal(4),
                            backend=backend, interpret=True, block_kv=16, **kw)
  np.testing.assert_allclose(out, reference(q, kc, vc, lens, kvl, masks.BlockCausal(4), **kw), atol=1e-5,
                             rtol=1e-5)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_decode_never_touches_tiles_past_the_length(backend):
  """NaN in every tile past each row's last needed tile: a computed (not skipped) tile would poison p @ v."""
  q, kc, vc, lens, kvl = make_inputs(b=2, t=4, lengths=[3, 20])  # kv_lengths 7 and 24 → tiles 0 and 0..1
  bk = 16
  k_abs = jnp.arange(S)[None, :, None, None]
  past = k_abs >= (-(-kvl // bk) * bk)[:, None, None, None]
  kc_bad, vc_bad = jnp.where(past, jnp.nan, kc), jnp.where(past, jnp.nan, vc)
  out = da.decode_attention(q, kc_bad, vc_bad, q_offsets=lens, kv_lengths=kvl, mask=masks.Causal(),
                            backend=backend, interpret=True, block_kv=bk)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, reference(q, kc, vc, lens, kvl, masks.Causal()), atol=1e-5, rtol=1e-5)


def test_decode_rows_that_see_nothing_are_zero():
  # Explicit table smaller than the cache: queries past it see no key → zeros, like the reference.
  mask = masks.Explicit(np.ones((8, 8), bool))
  q, kc, vc, lens, kvl = make_inputs(b=2, t=2, lengths=[0, 30])
  out = da.decode_attention(q, kc, vc, q_offsets=lens, kv_lengths=kvl, mask=mask, backend="gpu", interpret=True,
                            block_kv=16)
  np.testing.assert_array_equal(out[1], 0.0)
  np.testing.assert_allclose(out, reference(q, kc, vc, lens, kvl, mask), atol=1e-5, rtol=1e-5)


def test_decode_bf16_gpu_interpret():
  q, kc, vc, lens, kvl = make_inputs(dtype=jnp.bfloat16)
  out = da.decode_attention(q, kc, vc, q_offsets=lens, kv_lengths=kvl, mask=masks.Causal(), backend="gpu",
                            interpret=True, block_kv=16)
  ref = reference(q, kc, vc, lens, kvl, masks.Causal())
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), atol=2e-2, rtol=2e-2)


def test_decode_under_jit_matches():
  q, kc, vc, lens, kvl = make_inputs(t=1)
  f = jax.jit(functools.partial(da.decode_attention, mask=masks.Causal(), backend="gpu", interpret=True,
                                block_kv=16))
  out = f(q, kc, vc, q_offsets=lens, kv_lengths=kvl)
  np.testing.assert_allclose(out, reference(q, kc, vc, lens, kvl, masks.Causal()), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
      da.decode_attention_reference(q, kc, vc, q_offsets=lens, kv_lengths=kvl, mask=masks.Causal()),
      reference(q, kc, vc, lens, kvl, masks.Causal()), atol=0, rtol=0)


class _CondTableMask(masks.Mask):
  """A predicate whose gather hides inside a ``lax.cond`` branch (no captured constants: the table is built from
  iotas), so only a check that looks into cond branches sees that it cannot run in a kernel."""

  def predicate(self, q, k):
    table = jnp.eye(4, dtype=bool)
    return jax.lax.cond(jnp.all(q >= 0), lambda: table[q % 4, k % 4], lambda: k <= q)


def test_predicate_classification():
  assert common.predicate_runs_in_kernel(masks.Causal())
  assert common.predicate_runs_in_kernel(masks.BlockCausal(4) & masks.Causal())
  assert common.predicate_runs_in_kernel(masks.BD3(n=32, block_size=4))
  assert not common.predicate_runs_in_kernel(MASKS["tidar_explicit"])
  assert not common.predicate_runs_in_kernel(masks.Causal() & MASKS["tidar_explicit"])
  assert not common.predicate_runs_in_kernel(_CondTableMask())  # the gather inside the cond branch
  assert not common.predicate_runs_in_kernel(masks.Causal() | _CondTableMask())


def test_cond_table_mask_goes_through_the_table_in_both_kernels():
  """Both kernels take the one classification: the cond-hidden gather is served by the table path and matches."""
  from kernels_pallas import block_sparse_metadata as meta_lib
  mask = _CondTableMask() & masks.Causal()
  assert meta_lib.build_metadata(mask, 32, 32, 16, 16).partial_blocks is not None
  q, kc, vc, lens, kvl = make_inputs(t=2)
  out = da.decode_attention(q, kc, vc, q_offsets=lens, kv_lengths=kvl, mask=mask, backend="gpu", interpret=True,
                            block_kv=16)
  np.testing.assert_allclose(out, reference(q, kc, vc, lens, kvl, mask), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.mark.parametrize("case,match", [
    ("q_offsets_shape", r"q_offsets must have shape \(batch,\)"),
    ("kv_lengths_float", r"kv_lengths must be an integer array"),
    ("cache_shapes", r"k_cache .* and v_cache .* must have the same shape"),
    ("cache_rank", r"k_cache and v_cache must be \[batch, max_len, kv_heads, head_dim\]"),
    ("t_too_long", r"T=80 new tokens exceed the cache max_len=64"),
    ("gqa", r"kv_heads=3 must divide heads=4"),
    ("head_dim", r"head_dim 32 != cache head_dim 16"),
    ("block_kv", r"block_kv=24 must divide the cache max_len=64"),
    ("gpu_block_kv", r"GPU \(Triton\): block_kv=8 must be a power of two >= 16"),
    ("backend", r"backend must be one of"),
    ("cpu_no_backend", r"Pallas decode kernels run on TPU or GPU"),
])
def test_decode_bad_inputs(case, match):
  q, kc, vc, lens, kvl = make_inputs()
  kw = dict(q_offsets=lens, kv_lengths=kvl, mask=masks.Causal(), backend="gpu", interpret=True, block_kv=16)
  if case == "q_offsets_shape":
    kw["q_offsets"] = lens[:2]
  elif case == "kv_lengths_float":
    kw["kv_lengths"] = kvl.astype(jnp.float32)
  elif case == "cache_shapes":
    vc = vc[:, :32]
  elif case == "cache_rank":
    kc, vc = kc[..., 0], vc[..., 0]
  elif case == "t_too_long":
    q = jnp.zeros((3, 80, 4, 32))
  elif case == "gqa":
    kc = vc = jnp.zeros((3, S, 3, 32))
  elif case == "head_dim":
    kc = vc = jnp.zeros((3, S, 2, 16))
  elif case == "block_kv":
    kw["block_kv"] = 24
  elif case == "gpu_block_kv":
    kw["block_kv"] = 8
  elif case == "backend":
    kw["backend"] = "cuda"
  elif case == "cpu_no_backend":
    kw.update(backend=None, interpret=False)
  with pytest.raises(ValueError, match=match):
    da.decode_attention(q, kc, vc, **kw)


def test_tpu_table_mask_needs_lane_aligned_tiles():
  q, kc, vc, lens, kvl = make_inputs()
  with pytest.raises(ValueError, match="multiple of 128"):
    da.decode_attention(q, kc, vc, q_offsets=lens, kv_lengths=kvl, mask=MASKS["tidar_explicit"], backend="tpu",
                        interpret=True, block_kv=16)


# ------------------------------------------------------------------------------------------------------------------
# Routing (ardiff.attention).


def test_routing_cpu_without_override_raises():
  q, kc, vc, lens, kvl = make_inputs()
  with pytest.raises(RuntimeError, match="need a TPU or GPU.*interpret"):
    attention_lib.pallas_attention(q, kc, vc, mask=masks.Causal(), q_offsets=lens, kv_lengths=kvl)
  with pytest.raises(RuntimeError, match="need a TPU or GPU"):
    attention_lib.attention(q, kc, vc, mask=masks.Causal(), impl="pallas", q_offsets=lens, kv_lengths=kvl)
  with pytest.raises(RuntimeError, match="need a TPU or GPU"):  # the training path too, before any import
    attention_lib.pallas_attention(q, q, q, mask=masks.Causal())


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_routing_routes_cached_forward_to_decode(backend):
  q, kc, vc, lens, kvl = make_inputs(t=1, lengths=[0, 31, 40])
  ref = reference(q, kc, vc, lens, kvl, masks.Causal())
  with attention_lib.interpret_mode(backend=backend):
    out = attention_lib.attention(q, kc, vc, mask=masks.Causal(), impl="pallas", q_offsets=lens, kv_lengths=kvl)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  out2 = attention_lib.pallas_attention(q, kc, vc, mask=masks.Causal(), q_offsets=lens, kv_lengths=kvl,
                                        backend=backend, interpret=True)
  np.testing.assert_allclose(out2, ref, atol=1e-5, rtol=1e-5)


def test_routing_routes_full_forward_to_block_sparse(monkeypatch):
  calls = []

  def fake_block_sparse_attention(q, k, v, **kw):
    calls.append(kw)
    return q

  monkeypatch.setattr(attention_lib.block_sparse_lib, "block_sparse_attention", fake_block_sparse_attention)
  q = jnp.ones((2, 16, 4, 32))
  seg = jnp.ones((2, 16), jnp.int32)
  with attention_lib.interpret_mode(backend="gpu"):
    attention_lib.pallas_attention(q, q, q, mask=masks.BlockCausal(4), q_segment_ids=seg, kv_segment_ids=seg,
                                   sm_scale=0.5, q_offsets=jnp.zeros((2,), jnp.int32))
  (kw,) = calls
  assert kw["mask"] == masks.BlockCausal(4) and kw["sm_scale"] == 0.5
  assert kw["backend"] == "gpu" and kw["interpret"] is True
  assert kw["q_segment_ids"] is seg and kw["kv_segment_ids"] is seg
  assert "q_offsets" not in kw and "kv_lengths" not in kw


def test_routing_unsupported_combinations_raise():
  q, kc, vc, lens, kvl = make_inputs()
  seg = jnp.ones((3, 8), jnp.int32)
  with attention_lib.interpret_mode(backend="gpu"):
    with pytest.raises(NotImplementedError, match="segment ids with a KV cache"):
      attention_lib.pallas_attention(q, kc, vc, mask=masks.Causal(), q_offsets=lens, kv_lengths=kvl,
                                     q_segment_ids=seg, kv_segment_ids=jnp.ones((3, S), jnp.int32))
    with pytest.raises(NotImplementedError, match="nonzero q_offsets without kv_lengths"):
      attention_lib.pallas_attention(q, q, q, mask=masks.Causal(), q_offsets=jnp.asarray([0, 1, 0]))
    with pytest.raises(NotImplementedError, match="traced q_offsets"):
      jax.jit(lambda o: attention_lib.pallas_attention(q, q, q, mask=masks.Causal(), q_offsets=o))(lens)
    with pytest.raises(ValueError, match="kv_lengths was given without q_offsets"):
      attention_lib.pallas_attention(q, kc, vc, mask=masks.Causal(), kv_lengths=kvl)
  with pytest.raises(ValueError, match="interpret_mode backend must be one of"):
    with attention_lib.interpret_mode(backend="cpu"):
      pass
  assert attention_lib._INTERPRET.get() is None  # the context manager restores the default


# ------------------------------------------------------------------------------------------------------------------
# Cross-lowering for GPU (Triton) and real Mosaic compiles for TPU topologies.


def test_gpu_kernels_lower_to_triton():
  sds = jax.ShapeDtypeStruct
  b, t, h, kvh, d, s = 2, 8, 8, 2, 64, 256
  args = (sds((b, t, h, d), jnp.bfloat16), sds((b, s, kvh, d), jnp.bfloat16), sds((b, s, kvh, d), jnp.bfloat16),
          sds((b,), jnp.int32), sds((b,), jnp.int32))
  f = lambda q, kc, vc, qo, kl: da.decode_attention(q, kc, vc, q_offsets=qo, kv_lengths=kl,
                                                     mask=masks.BlockCausal(4), backend="gpu")
  assert "xla.gpu.triton" in jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@functools.lru_cache(maxsize=None)
def _tpu_mesh(generation):
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    topo = topologies.get_topology_desc(topology_name=f"{generation}:2x2", platform="tpu")
  except Exception as e:  # noqa: BLE001
    pytest.skip(f"no libtpu for AOT TPU compiles: {e}")
  return Mesh(np.array(topo.devices), ("data",))


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
def test_real_tpu_compile(generation):
  mesh = _tpu_mesh(generation)
  spec = P("data")
  b, t, h, kvh, d, s = 8, 8, 8, 2, 128, 1024

  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

  q, cache = sds((b, t, h, d), jnp.bfloat16), sds((b, s, kvh, d), jnp.bfloat16)
  ints = sds((b,), jnp.int32)
  for mask in (masks.BlockCausal(4), tidar_decode_mask(s, 8)):
    attn = lambda q, kc, vc, qo, kl, mask=mask: da.decode_attention(
        q, kc, vc, q_offsets=qo, kv_lengths=kl, mask=mask, backend="tpu")
    f = jax.jit(jax.shard_map(attn, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=False))
    txt = f.lower(q, cache, cache, ints, ints).compile().as_text()
    # The cache goes straight from the parameters into the Mosaic call: no relayout / copy of the whole cache.
    # Every HLO value of the cache's shape is a parameter (a relayout would define a copy/fusion/reshape of it).
    defs = re.findall(r"^\s*(?:ROOT )?%\S+ = bf16\[2,1024,2,128\]\{[^}]*\} ([\w-]+)\(", txt, re.M)
    assert defs and set(defs) == {"parameter"}, defs


def test_routing_full_forward_real_block_sparse_kernel():
  pytest.importorskip("kernels_pallas.block_sparse_attention")
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.standard_normal((2, 32, 4, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 32, 2, 16)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 32, 2, 16)), jnp.float32)
  with attention_lib.interpret_mode(backend="gpu"):
    out = attention_lib.attention(q, k, v, mask=masks.BlockCausal(4), impl="pallas")
  np.testing.assert_allclose(out, reference_attention(q, k, v, mask=masks.BlockCausal(4)),
                             atol=1e-5, rtol=1e-5)
