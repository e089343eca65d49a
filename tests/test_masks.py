"""Each mask's dense() against a Python double loop of its formula, and block classes against dense()."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks


def formula(name, q, k, **kw):
  """The formulas of docs/algorithms.md §3, written as plain Python on integers."""
  if name == "full":
    return True
  if name == "causal":
    return k <= q
  if name == "block_causal":
    return q // kw["B"] >= k // kw["B"]
  if name == "prefix":
    return k <= q or k < kw["P"]
  if name == "bd3":
    n, b = kw["n"], kw["B"]
    qc, kc = q >= n, k >= n
    bq, bk = (q - n * qc) // b, (k - n * kc) // b
    return (bq == bk and qc == kc) or (bq > bk and kc and not qc) or (bq >= bk and kc and qc)
  if name == "tidar":
    n, b = kw["n"], kw["B"]
    if q < n:
      return k < n and k <= q
    d = q - n
    if k < n:
      return k < (d // b) * b
    return (k - n) // b == d // b
  raise ValueError(name)


CASES = [
    ("full", masks.Full(), {}),
    ("causal", masks.Causal(), {}),
    ("block_causal", masks.BlockCausal(1), {"B": 1}),
    ("block_causal", masks.BlockCausal(3), {"B": 3}),
    ("block_causal", masks.BlockCausal(4), {"B": 4}),
    ("prefix", masks.PrefixLM(0), {"P": 0}),
    ("prefix", masks.PrefixLM(5), {"P": 5}),
    ("bd3", masks.BD3(8, 1), {"n": 8, "B": 1}),
    ("bd3", masks.BD3(12, 4), {"n": 12, "B": 4}),
    ("bd3", masks.BD3(12, 12), {"n": 12, "B": 12}),
    ("tidar", masks.TiDARTrain(12, 4), {"n": 12, "B": 4}),
    ("tidar", masks.TiDARTrain(9, 3), {"n": 9, "B": 3}),
]


def brute(name, q_len, kv_len, q_off=0, kv_off=0, **kw):
  out = np.zeros((q_len, kv_len), bool)
  for i, j in itertools.product(range(q_len), range(kv_len)):
    out[i, j] = formula(name, i + q_off, j + kv_off, **kw)
  return out


@pytest.mark.parametrize("name,mask,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_dense_matches_formula(name, mask, kw):
  size = 2 * kw["n"] if "n" in kw else 13
  np.testing.assert_array_equal(mask.dense(size, size), brute(name, size, size, **kw))
  # Offsets: a block of queries sitting at cache position p against the whole key range.
  np.testing.assert_array_equal(mask.dense(3, size, q_offset=size - 4),
                                brute(name, 3, size, q_off=size - 4, **kw))
  np.testing.assert_array_equal(mask.dense(5, 7, q_offset=2, kv_offset=3), brute(name, 5, 7, 2, 3, **kw))


@pytest.mark.parametrize("name,mask,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_predicate_is_the_same_in_jnp(name, mask, kw):
  size = 2 * kw["n"] if "n" in kw else 11
  q = jnp.arange(size)[:, None]
  k = jnp.arange(size)[None, :]
  got = jax.jit(lambda q, k: jnp.broadcast_to(mask.predicate(q, k), (size, size)))(q, k)
  np.testing.assert_array_equal(np.asarray(got), mask.dense(size, size))


def classes_from_dense(dense, bq, bk):
  q_len, kv_len = dense.shape
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  out = np.zeros((nq, nk), np.int8)
  for i in range(nq):
    for j in range(nk):
      tile = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
      out[i, j] = masks.EMPTY if not tile.any() else (masks.FULL if tile.all() else masks.PARTIAL)
  return out


@pytest.mark.parametrize("name,mask,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("bq,bk", [(1, 1), (2, 3), (4, 4), (5, 2), (8, 16), (32, 32)])
def test_block_classes_match_dense(name, mask, kw, bq, bk):
  size = 2 * kw["n"] if "n" in kw else 13
  for q_len, kv_len, q_off in ((size, size, 0), (size - 1, size, 0), (3, size, size - 3)):
    dense = mask.dense(q_len, kv_len, q_offset=q_off)
    got = mask.block_classes(q_len, kv_len, block_q=bq, block_kv=bk, q_offset=q_off)
    np.testing.assert_array_equal(got, classes_from_dense(dense, bq, bk))


def test_composition_and_explicit():
  rng = np.random.default_rng(0)
  arr = rng.random((10, 10)) < 0.4
  ex = masks.Explicit(arr)
  np.testing.assert_array_equal(ex.dense(10, 10), arr)
  np.testing.assert_array_equal(ex.dense(10, 12)[:, 10:], False)  # outside the array: masked
  both = masks.Causal() & masks.BlockCausal(3)
  either = masks.Causal() | ex
  np.testing.assert_array_equal(both.dense(10, 10), masks.Causal().dense(10, 10) & masks.BlockCausal(3).dense(10, 10))
  np.testing.assert_array_equal(either.dense(10, 10), masks.Causal().dense(10, 10) | arr)
  jnp_dense = jax.jit(lambda: jnp.broadcast_to(either.predicate(jnp.arange(10)[:, None], jnp.arange(10)[None]),
                                               (10, 10)))()
  np.testing.assert_array_equal(np.asarray(jnp_dense), either.dense(10, 10))
  np.testing.assert_array_equal(either.block_classes(10, 10, block_q=3, block_kv=4),
                                classes_from_dense(either.dense(10, 10), 3, 4))


def test_masks_are_hashable_values():
  assert masks.BD3(8, 4) == masks.BD3(8, 4) and hash(masks.BD3(8, 4)) == hash(masks.BD3(8, 4))
  assert masks.BD3(8, 4) != masks.BD3(8, 2)
  arr = np.eye(4, dtype=bool)
  assert masks.Explicit(arr) == masks.Explicit(arr.copy()) and len({masks.Explicit(arr), masks.Explicit(arr)}) == 1
  assert masks.Causal() & masks.Full() == masks.Causal() & masks.Full()


def test_mask_identities():
  n, b = 16, 4
  bd3 = masks.BD3(n, b).dense(2 * n, 2 * n)
  np.testing.assert_array_equal(bd3[n:, n:], masks.BlockCausal(b).dense(n, n))  # clean half = block-causal
  assert not bd3[n:, :n].any()  # clean rows never see noisy tokens
  np.testing.assert_array_equal(masks.BD3(n, n).dense(2 * n, 2 * n)[:n, :n], True)  # B = n: MDLM
  np.testing.assert_array_equal(masks.BD3(n, 1).dense(2 * n, 2 * n)[:n, n:], np.tril(np.ones((n, n)), -1) > 0)
  assert abs(masks.BD3(128, 16).density(256, 256) - (0.25 + 16 / (4 * 128))) < 1e-12
  tidar = masks.TiDARTrain(n, b).dense(2 * n, 2 * n)
  assert not tidar[:n, n:].any()  # AR rows never see draft masks


def test_segments_compose():
  seg = np.array([[1, 1, 2, 2, 2, 0]])
  got = masks.dense_with_segments(masks.Causal(), seg, seg)[0]
  want = np.zeros((6, 6), bool)
  for i, j in itertools.product(range(6), range(6)):
    want[i, j] = j <= i and seg[0, i] == seg[0, j] and seg[0, i] != 0
  np.testing.assert_array_equal(got, want)
  assert not got[5].any()  # padding rows see nothing, not each other


@pytest.mark.parametrize("bad", [lambda: masks.BD3(10, 4), lambda: masks.BlockCausal(0), lambda: masks.PrefixLM(-1),
                                 lambda: masks.TiDARTrain(6, 4), lambda: masks.Explicit(np.ones(3, bool))])
def test_bad_masks_raise(bad):
  with pytest.raises(ValueError):
    bad()
