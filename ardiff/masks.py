"""Attention-mask algebra: one predicate feeds the dense reference, the Pallas kernels and the samplers.

A mask is a frozen, hashable value. Each one has

* ``predicate(q, k)``: elementwise ``bool`` over **absolute** query and key indices. It uses only integer
  arithmetic and comparisons, so the same code runs on numpy arrays on the host and on ``jnp`` arrays inside
  ``jit`` or a Pallas kernel. Broadcasting does the rest (``q[:, None]``, ``k[None, :]``).
* ``dense(q_len, kv_len, q_offset=0, kv_offset=0)``: a numpy ``bool[q_len, kv_len]`` for queries
  ``q_offset + arange(q_len)`` and keys ``kv_offset + arange(kv_len)``. Offsets let a block of queries sitting at
  cache position ``p`` use the same mask as the full sequence.
* ``block_classes(q_len, kv_len, block_q=, block_kv=)``: ``int8[ceil(q_len/bq), ceil(kv_len/bk)]`` with
  ``EMPTY`` (skip the tile), ``PARTIAL`` (apply the predicate elementwise) or ``FULL`` (no masking needed).
  Only in-range elements count: a ragged edge tile whose in-range part is all allowed is ``FULL``; kernels that pad
  must mask padded keys themselves.

Masks compose with ``&`` and ``|``. Packing is a *dynamic* term (``segment_ids`` are data), so it is not a mask
value; :func:`segment_predicate` gives the term and :func:`dense_with_segments` the composed dense array. Block
classification is static and ignores segments: segments can only remove more entries (never turn EMPTY into
non-empty), so skipping by the static classes stays exact.

Formulas: ``docs/algorithms.md`` §3. Index conventions:

* ``BD3(n, B)`` acts on the 2n sequence ``[x_t (0..n-1) ; x_0 (n..2n-1)]``.
* ``TiDARTrain(n, B)`` acts on ``[clean (0..n-1) ; draft (n..2n-1)]``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


def _check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class Mask:
  """Base class. Subclasses are frozen dataclasses that implement :meth:`predicate`."""

  def predicate(self, q, k):
    raise NotImplementedError

  def __and__(self, other: "Mask") -> "Mask":
    return And(self, other)

  def __or__(self, other: "Mask") -> "Mask":
    return Or(self, other)

  def dense(self, q_len: int, kv_len: int, *, q_offset: int = 0, kv_offset: int = 0) -> np.ndarray:
    """Numpy ``bool[q_len, kv_len]``: entry (i, j) is whether query ``q_offset+i`` may see key ``kv_offset+j``."""
    q = np.arange(q_len, dtype=np.int64)[:, None] + q_offset
    k = np.arange(kv_len, dtype=np.int64)[None, :] + kv_offset
    return np.broadcast_to(np.asarray(self.predicate(q, k), dtype=bool), (q_len, kv_len)).copy()

  def block_classes(self, q_len: int, kv_len: int, *, block_q: int, block_kv: int, q_offset: int = 0,
                    kv_offset: int = 0) -> np.ndarray:
    """``int8[nq, nk]`` of EMPTY/PARTIAL/FULL per (block_q, block_kv) tile; cached per static shape."""
    return _block_classes(self, int(q_len), int(kv_len), int(block_q), int(block_kv), int(q_offset),
                          int(kv_offset)).copy()

  def density(self, q_len: int, kv_len: int) -> float:
    return float(self.dense(q_len, kv_len).mean())


@functools.lru_cache(maxsize=64)
def _block_classes(mask: Mask, q_len: int, kv_len: int, bq: int, bk: int, q_offset: int,
                   kv_offset: int) -> np.ndarray:
  for name, v in (("q_len", q_len), ("kv_len", kv_len), ("block_q", bq), ("block_kv", bk)):
    _check_positive_int(name, v)
  nq, nk = -(-q_len // bq), -(-kv_len // bk)
  k = np.arange(nk * bk, dtype=np.int64)[None, :]
  k_valid = k < kv_len
  classes = np.empty((nq, nk), dtype=np.int8)
  for i in range(nq):  # one row of tiles at a time: memory stays O(bq * kv_len) for long sequences
    rows = np.arange(i * bq, min((i + 1) * bq, q_len), dtype=np.int64)[:, None]
    allowed = np.broadcast_to(np.asarray(mask.predicate(rows + q_offset, k + kv_offset), bool),
                              (rows.shape[0], nk * bk)) & k_valid
    n_allowed = allowed.reshape(rows.shape[0], nk, bk).sum(axis=(0, 2))
    n_valid = rows.shape[0] * k_valid.reshape(nk, bk).sum(axis=1)
    classes[i] = np.where(n_allowed == 0, EMPTY, np.where(n_allowed == n_valid, FULL, PARTIAL))
  return classes


# ------------------------------------------------------------------------------------------------------------------
# Structured masks.


@dataclasses.dataclass(frozen=True)
class Full(Mask):
  """Every query sees every key (bidirectional; MDLM)."""

  def predicate(self, q, k):
    return (q == q) & (k == k)  # all-True with the broadcast shape, in whatever array type q and k are


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """``k <= q`` (AR)."""

  def predicate(self, q, k):
    return k <= q


@dataclasses.dataclass(frozen=True)
class BlockCausal(Mask):
  """``q // B >= k // B``: bidirectional inside a block, causal across blocks. B = 1 is causal, B >= L is full."""

  block_size: int

  def __post_init__(self):
    _check_positive_int("BlockCausal.block_size", self.block_size)

  def predicate(self, q, k):
    return (q // self.block_size) >= (k // self.block_size)


@dataclasses.dataclass(frozen=True)
class PrefixLM(Mask):
  """Bidirectional over the first ``prefix_len`` tokens, causal after: ``k <= q or k < P``."""

  prefix_len: int

  def __post_init__(self):
    if not isinstance(self.prefix_len, (int, np.integer)) or self.prefix_len < 0:
      raise ValueError(f"PrefixLM.prefix_len must be a non-negative integer, got {self.prefix_len!r}.")

  def predicate(self, q, k):
    return (k <= q) | (k < self.prefix_len)


@dataclasses.dataclass(frozen=True)
class BD3(Mask):
  """BD3-LM 2n training mask over ``[x_t ; x_0]`` (docs/algorithms.md §3.2; arXiv 2503.09573).

  Noisy block b sees itself and clean blocks < b; the clean half is block-causal (what the KV cache holds).
  """

  n: int
  block_size: int

  def __post_init__(self):
    _check_positive_int("BD3.n", self.n)
    _check_positive_int("BD3.block_size", self.block_size)
    if self.n % self.block_size:
      raise ValueError(f"BD3: block_size={self.block_size} must divide the sequence length n={self.n}; "
                       f"pick a block size that divides {self.n} or pad the sequence to a multiple of it.")

  def predicate(self, q, k):
    n, b = self.n, self.block_size
    qc, kc = q >= n, k >= n
    bq = (q - n * qc) // b
    bk = (k - n * kc) // b
    diag = (bq == bk) & (qc == kc)
    offset_block_causal = (bq > bk) & kc & ~qc
    clean_block_causal = (bq >= bk) & kc & qc
    return diag | offset_block_causal | clean_block_causal


@dataclasses.dataclass(frozen=True)
class TiDARTrain(Mask):
  """TiDAR training mask over ``[clean ; draft]`` (docs/algorithms.md §3.3; arXiv 2511.08923).

  Clean rows are causal and never see drafts; draft block j sees clean tokens before ``j * B`` and its own block.
  """

  n: int
  block_size: int

  def __post_init__(self):
    _check_positive_int("TiDARTrain.n", self.n)
    _check_positive_int("TiDARTrain.block_size", self.block_size)
    if self.n % self.block_size:
      raise ValueError(f"TiDARTrain: block_size={self.block_size} must divide n={self.n}.")

  def predicate(self, q, k):
    n, b = self.n, self.block_size
    qd, kd = q >= n, k >= n
    clean_causal = ~qd & ~kd & (k <= q)
    draft_to_clean = qd & ~kd & (k < ((q - n) // b) * b)
    draft_own_block = qd & kd & (((k - n) // b) == ((q - n) // b))
    return clean_causal | draft_to_clean | draft_own_block


@dataclasses.dataclass(frozen=True, eq=False)
class Explicit(Mask):
  """Any mask given as a numpy ``bool[Q, K]`` array (indices outside it are masked). Hashed by content."""

  array: np.ndarray

  def __post_init__(self):
    arr = np.asarray(self.array)
    if arr.ndim != 2:
      raise ValueError(f"Explicit mask must be 2-D [q_len, kv_len], got shape {arr.shape}.")
    arr = np.ascontiguousarray(arr.astype(bool))
    arr.setflags(write=False)
    object.__setattr__(self, "array", arr)
    object.__setattr__(self, "_digest", hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest())

  def __hash__(self):
    return hash(self._digest)

  def __eq__(self, other):
    return isinstance(other, Explicit) and self._digest == other._digest

  def __repr__(self):
    return f"Explicit(shape={self.array.shape}, digest={self._digest[:10]})"

  def predicate(self, q, k):
    qn, kn = self.array.shape
    valid = (q >= 0) & (q < qn) & (k >= 0) & (k < kn)
    if isinstance(q, np.ndarray) or isinstance(k, np.ndarray) or np.isscalar(q):
      qi, ki = np.clip(q, 0, qn - 1), np.clip(k, 0, kn - 1)
      return self.array[qi, ki] & valid
    import jax.numpy as jnp  # only inside traced code
    table = jnp.asarray(self.array)
    return table[jnp.clip(q, 0, qn - 1), jnp.clip(k, 0, kn - 1)] & valid


@dataclasses.dataclass(frozen=True)
class And(Mask):
  a: Mask
  b: Mask

  def predicate(self, q, k):
    return self.a.predicate(q, k) & self.b.predicate(q, k)


@dataclasses.dataclass(frozen=True)
class Or(Mask):
  a: Mask
  b: Mask

  def predicate(self, q, k):
    return self.a.predicate(q, k) | self.b.predicate(q, k)


# ------------------------------------------------------------------------------------------------------------------
# Packing (dynamic) term.


def segment_predicate(seg_q, seg_k):
  """``seg_q == seg_k and seg_q != 0`` with broadcasting; segment 0 is padding (grain packers' convention).

  Requiring ``seg != 0`` matters: padding tokens otherwise all share segment 0 and attend to each other.
  """
  return (seg_q == seg_k) & (seg_q != 0)


def dense_with_segments(mask: Mask, seg_q: np.ndarray, seg_k: np.ndarray, *, q_offset: int = 0,
                        kv_offset: int = 0) -> np.ndarray:
  """``bool[..., q_len, kv_len]``: the static mask and the packing term, for segment ids ``[..., len]``."""
  seg_q, seg_k = np.asarray(seg_q), np.asarray(seg_k)
  base = mask.dense(seg_q.shape[-1], seg_k.shape[-1], q_offset=q_offset, kv_offset=kv_offset)
  return base & segment_predicate(seg_q[..., :, None], seg_k[..., None, :])
