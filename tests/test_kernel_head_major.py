"""The block-sparse kernel's head-major input path (``layout="bhtd"``): q ``[b, h, T, d]``, k/v ``[b, kvh, S, d]``
go to the kernels as they are (no transpose in or out), with the same values and gradients as the default
token-major layout and as the dense reference. Kernels run in the Pallas interpreter on CPU (TPU: Mosaic
semantics under ``pltpu.InterpretParams``; GPU: generic interpret)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks
from kernels_pallas.block_sparse_attention import block_sparse_attention
from kernels_pallas.reference import reference_attention

TILES = {"tpu": 128, "gpu": 64}
TOL = dict(atol=2e-5, rtol=2e-5)


def _inputs(seed, b, t, s, h, kvh, d):
  """Head-major q, k, v and an output cotangent, f32."""
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, h, t, d), jnp.float32)
  k = jax.random.normal(ks[1], (b, kvh, s, d), jnp.float32)
  v = jax.random.normal(ks[2], (b, kvh, s, d), jnp.float32)
  w = jax.random.normal(ks[3], (b, h, t, d), jnp.float32)
  return q, k, v, w


def _value_and_grads(fn, q, k, v, w):
  out, pullback = jax.vjp(fn, q, k, v)
  return (out,) + pullback(w)


def _swap(x):
  return jnp.swapaxes(x, 1, 2)


# (id, mask, q_len, kv_len, heads, kv_heads, segments)
CASES = [
    ("bd3_gqa", masks.BD3(128, 16), 256, 256, 4, 2, False),
    ("causal_ragged", masks.Causal(), 200, 200, 2, 1, False),  # padded to the tile inside, sliced on the way out
    ("prefix_cross", masks.PrefixLM(70), 136, 264, 2, 2, False),
    ("packed_causal", masks.Causal(), 256, 256, 2, 2, True),
]


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_head_major_matches_token_major_and_reference(backend, case):
  name, mask, t, s, h, kvh, segmented = case
  q, k, v, w = _inputs(sum(map(ord, name)), 1, t, s, h, kvh, 32)
  kw = dict(mask=mask)
  if segmented:
    seg = jnp.asarray(np.repeat(np.array([1, 2, 0], np.int32), [100, 120, 36])[None])
    kw.update(q_segment_ids=seg, kv_segment_ids=seg)
  tile = TILES[backend]
  kern = functools.partial(block_sparse_attention, backend=backend, interpret=True, block_q=tile, block_kv=tile,
                           **kw)
  head_major = jax.jit(lambda *a: _value_and_grads(functools.partial(kern, layout="bhtd"), *a))(q, k, v, w)
  token_major = jax.jit(lambda *a: _value_and_grads(kern, *a))(*map(_swap, (q, k, v, w)))
  want = jax.jit(lambda *a: _value_and_grads(functools.partial(reference_attention, **kw), *a))(
      *map(_swap, (q, k, v, w)))
  for label, got, tm, ref in zip(("out", "dq", "dk", "dv"), head_major, token_major, want):
    assert got.shape == _swap(ref).shape, (label, got.shape)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_swap(tm)), err_msg=label)  # one kernel, one result
    np.testing.assert_allclose(np.asarray(got), np.asarray(_swap(ref)), err_msg=label, **TOL)


def _outer_primitives(jaxpr) -> set:
  """Primitive names of a jaxpr and its sub-jaxprs (custom_vjp, pjit, ...), not looking inside kernels."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    if eqn.primitive.name == "pallas_call":
      continue
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          names |= _outer_primitives(inner)
  return names


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_head_major_call_has_no_transpose(backend):
  """With lengths that divide the tile, the head-major call is the kernels alone: no transpose (nor pad) around
  them, forward or backward; the token-major call transposes q, k, v and the output."""
  q, k, v, w = _inputs(0, 1, 256, 256, 2, 1, 32)
  tile = TILES[backend]
  call = functools.partial(block_sparse_attention, mask=masks.Causal(), backend=backend, interpret=True,
                           block_q=tile, block_kv=tile)
  grads = lambda layout: jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(call(*a, layout=layout) * w0),
                                                 argnums=(0, 1, 2)))
  w0 = w
  fwd = _outer_primitives(jax.make_jaxpr(functools.partial(call, layout="bhtd"))(q, k, v).jaxpr)
  bwd = _outer_primitives(grads("bhtd")(q, k, v).jaxpr)
  assert "pallas_call" in fwd | bwd
  assert not ({"transpose", "pad"} & (fwd | bwd)), (fwd, bwd)
  w0 = _swap(w)
  token_major = _outer_primitives(grads("bthd")(*map(_swap, (q, k, v))).jaxpr)
  assert "transpose" in token_major


@pytest.mark.parametrize("shapes,match", [
    (((1, 2, 64, 32), (1, 1, 64, 16), (1, 1, 64, 16)), "head_dim"),
    (((1, 2, 64, 32), (1, 3, 64, 32), (1, 3, 64, 32)), "kv_heads=3 must divide heads=2"),
    (((1, 2, 64), (1, 1, 64, 32), (1, 1, 64, 32)), r"q must be \[batch, heads, len, head_dim\] \(layout='bhtd'\)"),
    (((1, 2, 64, 32), (1, 1, 64, 32), (1, 1, 60, 32)), r"\[batch, kv_heads, kv_len, head_dim\]"),
])
def test_head_major_bad_shapes_raise(shapes, match):
  q, k, v = (jnp.zeros(s, jnp.float32) for s in shapes)
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, k, v, mask=masks.Causal(), backend="tpu", interpret=True, layout="bhtd")


def test_head_major_segment_ids_keep_batch_by_length():
  q, k, v, _ = _inputs(1, 1, 128, 128, 2, 2, 32)
  with pytest.raises(ValueError, match=r"q_segment_ids must be \[batch, q_len\] = \(1, 128\)"):
    block_sparse_attention(q, k, v, mask=masks.Causal(), backend="tpu", interpret=True, layout="bhtd",
                           q_segment_ids=jnp.ones((1, 2), jnp.int32), kv_segment_ids=jnp.ones((1, 128), jnp.int32))


def test_unknown_layout_raises_before_any_work():
  q = jnp.zeros((1, 64, 2, 32))
  with pytest.raises(ValueError, match=r"layout must be one of \('bthd', 'bhtd'\).*'thd'"):
    block_sparse_attention(q, q, q, mask=masks.Causal(), backend="tpu", interpret=True, layout="thd")
