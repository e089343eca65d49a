"""The fast XLA attention path (ardiff/attention_xla.py) against the dense reference: forward and gradients, every
mask kind, packing/padding segments, GQA, soft cap, forced tile sizes (so the row-group/run split runs at tiny
shapes), and the plan's structure (BD3's noisy block as a block-diagonal run, empty tiles never computed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import attention as attention_lib
from ardiff import attention_xla
from ardiff import masks
from kernels_pallas.reference import reference_attention

F32_TOL = dict(atol=1e-5, rtol=1e-5)  # as tests/test_block_sparse_attention.py
BF16_FWD_TOL = dict(atol=2.5e-2, rtol=2.5e-2)
BF16_GRAD_TOL = dict(atol=5e-2, rtol=5e-2)


def _inputs(seed, b, t, h, kvh, d, dtype):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, kvh, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, kvh, d), jnp.float32).astype(dtype)
  w = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(dtype)
  return q, k, v, w


def _segments(length):
  """Row 0: two documents; row 1: one document then padding (segment 0 rows see nothing: zeros)."""
  seg = np.ones((2, length), np.int32)
  seg[0, length // 3:] = 2
  seg[1, length - 5:] = 0
  return jnp.asarray(seg)


def _check(mask, length, *, tile, h=4, kvh=2, seg=False, dtype=jnp.float32, cap=None, seed=0):
  q, k, v, w = _inputs(seed, 2, length, h, kvh, 8, dtype)
  s = _segments(length) if seg else None
  kw = dict(mask=mask, q_segment_ids=s, kv_segment_ids=s, logit_soft_cap=cap)

  @jax.jit  # one program for both paths: one compile per case
  def both(q, k, v, w):
    res = []
    for fn in (lambda q, k, v: attention_xla.tiled_attention(q, k, v, tile=tile, **kw),
               lambda q, k, v: reference_attention(q, k, v, **kw)):
      out, pullback = jax.vjp(fn, q, k, v)
      res.append((out,) + pullback(w))
    return res

  got_all, want_all = both(q, k, v, w)
  for name, got, want in zip(("out", "dq", "dk", "dv"), got_all, want_all):
    tol = F32_TOL if dtype == jnp.float32 else (BF16_FWD_TOL if name == "out" else BF16_GRAD_TOL)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=name, **tol)
  return got_all[0]


CASES = [  # (id, mask, length, tile)
    ("bd3", masks.BD3(16, 4), 32, 8),
    ("tidar", masks.TiDARTrain(16, 4), 32, 8),
    ("block_causal_ragged", masks.BlockCausal(4), 20, 8),  # 20 is not a multiple of the tile
    ("explicit", masks.Explicit(np.random.default_rng(3).random((24, 24)) < 0.3), 24, 8),  # has empty rows
]


@pytest.mark.parametrize("mask,length,tile", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_tiled_matches_reference_with_segments_and_gqa(mask, length, tile):
  out = _check(mask, length, tile=tile, seg=True)
  s = np.asarray(_segments(length))
  assert np.all(np.asarray(out)[s == 0] == 0.0)  # padding rows see no key: zeros, not an average


def test_tiled_plain_mha_bf16_and_soft_cap():
  # _check asserts the tiled output and gradients equal the dense reference's at the bf16 tolerances
  out = _check(masks.BD3(12, 2), 24, tile=8, h=2, kvh=2, dtype=jnp.bfloat16, cap=5.0, seed=1)
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))


def test_plan_bd3_structure():
  """BD3 2L at L=128, B=4: the noisy block is a block-diagonal run (rows x B scores, not rows x rows), the clean
  rows never touch the noisy half, and fewer than half of the dense score entries are computed."""
  mask, n = masks.BD3(128, 4), 128
  plan = attention_xla.plan(mask, 2 * n, 2 * n)
  dense = mask.dense(2 * n, 2 * n)
  computed = 0
  covered = np.zeros_like(dense)
  for g in plan.groups:
    rows = g.row_stop - g.row_start
    for r in g.runs:
      if r.period:
        assert r.period == 4 and r.stop <= n and g.row_stop <= n  # a noisy row group seeing its own blocks
        computed += rows * r.period
      else:
        computed += rows * (r.stop - r.start)
      covered[g.row_start:g.row_stop, r.start:r.stop] = True
      if g.row_start >= n:
        assert r.start >= n  # clean rows: clean keys only
  assert not np.any(dense & ~covered)  # every allowed entry is inside some run
  assert computed < 0.5 * dense.size


def test_plan_of_a_long_sequence_stays_a_few_groups():
  """At 2L = 4096 the entry-count optimum is 128 groups, each its own dots and softmax (a TPU compile of minutes);
  the plan keeps at most MAX_GROUPS and still computes under 30% of the dense scores (25% are allowed)."""
  plan = attention_xla.plan(masks.BD3(2048, 16), 4096, 4096)
  assert len(plan.groups) <= attention_xla.MAX_GROUPS
  assert plan.cost < 0.3 * 4096 ** 2
  assert attention_xla.plan(masks.BD3(128, 4), 256, 256).tile == 32  # short sequences keep their small tiles


def test_routing_xla_impl_uses_tiled_path_and_cache_uses_reference():
  q, k, v, _ = _inputs(1, 2, 32, 4, 2, 8, jnp.float32)
  mask = masks.BD3(16, 4)
  np.testing.assert_allclose(attention_lib.attention(q, k, v, mask=mask, impl="xla"),
                             attention_xla.tiled_attention(q, k, v, mask=mask), atol=0, rtol=0)
  lengths = jnp.asarray([3, 9], jnp.int32)
  got = attention_lib.attention(q[:, :4], k, v, mask=masks.Causal(), impl="xla", q_offsets=lengths,
                                kv_lengths=lengths + 4)
  want = reference_attention(q[:, :4], k, v, mask=masks.Causal(), q_offsets=lengths, kv_lengths=lengths + 4)
  np.testing.assert_allclose(got, want, atol=0, rtol=0)
  with pytest.raises(ValueError, match="both q_segment_ids and kv_segment_ids"):
    attention_xla.xla_attention(q, k, v, mask=mask, q_segment_ids=jnp.ones((2, 32), jnp.int32))
