"""The fast XLA attention path: only the non-empty parts of a structured mask are computed.

Same contract as :func:`kernels_pallas.reference.reference_attention` (which stays the test oracle): ``q`` is
``[batch, q_len, heads, head_dim]``, ``k``/``v`` ``[batch, kv_len, kv_heads, head_dim]``, a static
:class:`ardiff.masks.Mask`, optional packing segment ids; rows that see no key give zeros (and zero gradients).

How
---
The dense reference materialises the whole ``q_len x kv_len`` score matrix and masks it. For the structured masks
of training (causal, block-causal, BD3's 2L mask, TiDAR) most of it is empty. A host-side *plan*, built once per
static ``(mask, q_len, kv_len)`` from ``mask.block_classes``, splits the queries into row groups (consecutive query
tiles that see the same kv tiles); each group attends only to the contiguous key *runs* of its non-empty tiles, and
one softmax spans the group's runs. A run that is block-diagonal with period ``s`` relative to the group's rows
(BD3's noisy block seeing itself, TiDAR's draft block) is computed as ``rows x s`` scores by reshaping into blocks,
not ``rows x rows``. The elementwise mask is applied only where a tile is partial, as a constant from
``mask.dense``. The tile size is chosen by a cost model (score entries computed + a per-group overhead).

On GPU, fp16/bf16 inputs go to ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN flash attention)
with the mask as a boolean array (``is_causal`` for :class:`~ardiff.masks.Causal`); rows with no allowed key are
zeroed after the call, which keeps the reference's semantics.

Cached forwards (``kv_lengths``: queries at per-row dynamic offsets) use the dense reference: their ``q_len`` is a
block or a token, and the static tile classes do not apply to dynamic offsets.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ardiff import masks as masks_lib
from kernels_pallas.common import NEG_INF
from kernels_pallas.reference import allowed_bqk, check_shapes, reference_attention

TILES = (16, 32, 64, 128, 256, 512)
GROUP_OVERHEAD = 512  # score entries (per batch row and head) one more group costs in op overheads (CPU-measured)
# Each group is its own dots and softmax in the program: at 2L = 4096 the cheapest plan by score entries alone has
# 128 groups per layer, which took the TPU compiler minutes (the 1B config's compile check) for a path whose point is
# fewer entries. Plans are limited to tilings of at most this many query tiles.
MAX_GROUPS = 16


@dataclasses.dataclass(frozen=True)
class Run:
  """Keys ``[start, stop)`` seen by a row group; ``period`` > 0: block-diagonal (row i sees keys of its own
  ``period``-block only, rows and keys aligned); ``allowed``: static bool ``[rows, keys or period]`` or None (all)."""

  start: int
  stop: int
  period: int
  allowed: Optional[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Group:
  row_start: int
  row_stop: int
  runs: tuple
  rows_nonempty: bool  # every row sees at least one key (by the static mask): no empty-row guard needed


@dataclasses.dataclass(frozen=True)
class Plan:
  groups: tuple  # covering [0, q_len) in order; rows outside every group see nothing
  tile: int
  cost: int


def _blockdiag_period(allowed: np.ndarray) -> int:
  """``s`` if ``allowed`` (square) is exactly block-diagonal with ``s x s`` blocks of ones, else 0."""
  n = allowed.shape[0]
  if allowed.shape[1] != n:
    return 0
  s = int(allowed[0].sum())
  if s < 1 or s == n or n % s:
    return 0
  pattern = np.kron(np.eye(n // s, dtype=bool), np.ones((s, s), dtype=bool))
  return s if np.array_equal(allowed, pattern) else 0


def _split_diagonal(rows_allowed: np.ndarray, c0: int, c1: int, tile: int) -> list:
  """``[(start, stop), ...]`` covering ``[c0, c1)``: a tile-aligned sub-run as wide as the group that is
  block-diagonal (BD3's noisy block seeing itself next to the clean prefix) is cut out as a run of its own."""
  rows = rows_allowed.shape[0]
  for c in range(c0, c1 - rows + 1, tile):
    if _blockdiag_period(rows_allowed[:, c:c + rows]):
      return [r for r in ((c0, c), (c, c + rows), (c + rows, c1)) if r[1] > r[0]]
  return [(c0, c1)]


@functools.lru_cache(maxsize=64)
def _plan_for_tile(mask: masks_lib.Mask, q_len: int, kv_len: int, tile: int) -> Plan:
  classes = mask.block_classes(q_len, kv_len, block_q=tile, block_kv=tile)
  dense = mask.dense(q_len, kv_len)
  groups, cost, i = [], 0, 0
  nq = classes.shape[0]
  while i < nq:
    j = i + 1
    while j < nq and np.array_equal(classes[j] != masks_lib.EMPTY, classes[i] != masks_lib.EMPTY):
      j += 1  # consecutive query tiles that see the same kv tiles share one group
    r0, r1 = i * tile, min(j * tile, q_len)
    live = np.flatnonzero(classes[i] != masks_lib.EMPTY)
    runs = []
    for t in live:
      if runs and runs[-1][1] == t:
        runs[-1][1] = t + 1
      else:
        runs.append([t, t + 1])
    group_runs = []
    for t0, t1 in runs:
      for c0, c1 in _split_diagonal(dense[r0:r1], t0 * tile, min(t1 * tile, kv_len), tile):
        sub = dense[r0:r1, c0:c1]
        period = _blockdiag_period(sub)
        if period:
          group_runs.append(Run(c0, c1, period, None))
          cost += (r1 - r0) * period
        else:
          group_runs.append(Run(c0, c1, 0, None if sub.all() else sub))
          cost += (r1 - r0) * (c1 - c0)
    if group_runs:
      rows_nonempty = bool(dense[r0:r1].any(axis=1).all())
      groups.append(Group(r0, r1, tuple(group_runs), rows_nonempty))
      cost += GROUP_OVERHEAD
    i = j
  return Plan(tuple(groups), tile, cost)


@functools.lru_cache(maxsize=64)
def plan(mask: masks_lib.Mask, q_len: int, kv_len: int) -> Plan:
  """The cheapest tiling (by :data:`GROUP_OVERHEAD`-weighted score entries) of ``mask`` at these lengths, among
  tiles that cut the queries into at most :data:`MAX_GROUPS` tiles."""
  smaller = [t for t in TILES if t < max(q_len, kv_len)]
  # past MAX_GROUPS * TILES[-1] queries the largest tile stays a candidate (else only the dense one-tile plan would)
  candidates = [t for t in smaller if -(-q_len // t) <= MAX_GROUPS] or smaller[-1:]
  candidates.append(max(q_len, kv_len))  # one tile: the dense computation (minus empty rows / diagonal runs)
  return min((_plan_for_tile(mask, q_len, kv_len, t) for t in candidates), key=lambda p: (p.cost, len(p.groups)))


def cudnn_eligible(q, k, *, mask, q_offsets, kv_lengths, logit_soft_cap) -> bool:
  """Whether the call goes to cuDNN flash attention: a GPU, fp16/bf16, no cache offsets, no soft cap, and a
  head_dim cuDNN supports."""
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.dtype == k.dtype
          and kv_lengths is None and q_offsets is None and logit_soft_cap is None
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def xla_attention(q, k, v, *, mask: masks_lib.Mask, q_offsets=None, q_segment_ids=None, kv_segment_ids=None,
                  kv_lengths=None, sm_scale=None, logit_soft_cap=None) -> jax.Array:
  """Masked attention, ``[batch, q_len, heads, head_dim]`` in q's dtype (see the module docstring)."""
  check_shapes(q, k, v)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("Pass both q_segment_ids and kv_segment_ids, or neither.")
  if kv_lengths is not None or q_offsets is not None:
    return reference_attention(q, k, v, mask=mask, q_offsets=q_offsets, q_segment_ids=q_segment_ids,
                               kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths, sm_scale=sm_scale,
                               logit_soft_cap=logit_soft_cap)
  if cudnn_eligible(q, k, mask=mask, q_offsets=q_offsets, kv_lengths=kv_lengths, logit_soft_cap=logit_soft_cap):
    return cudnn_attention(q, k, v, mask=mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                           sm_scale=sm_scale)
  return tiled_attention(q, k, v, mask=mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         sm_scale=sm_scale, logit_soft_cap=logit_soft_cap)


def cudnn_attention(q, k, v, *, mask, q_segment_ids=None, kv_segment_ids=None, sm_scale=None):
  """cuDNN flash attention through ``jax.nn.dot_product_attention``; fully masked rows give zeros."""
  b, t, _, d = q.shape
  s = k.shape[1]
  causal = isinstance(mask, masks_lib.Causal)
  if causal and q_segment_ids is None:
    allowed = None
  else:
    allowed = allowed_bqk(masks_lib.Full() if causal else mask, batch=b, q_len=t, kv_len=s,
                          q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  out = jax.nn.dot_product_attention(q, k, v, mask=None if allowed is None else allowed[:, None],
                                     scale=d ** -0.5 if sm_scale is None else sm_scale, is_causal=causal,
                                     implementation="cudnn")
  if allowed is None:
    return out
  any_key = jnp.any(allowed & (mask.predicate(jnp.arange(t)[:, None], jnp.arange(s)[None, :]) if causal else True),
                    axis=-1)  # [b|1, t]: cuDNN averages the values of a row with no allowed key; the contract is 0
  return out * any_key[:, :, None, None].astype(out.dtype)


def tiled_attention(q, k, v, *, mask: masks_lib.Mask, q_segment_ids=None, kv_segment_ids=None, sm_scale=None,
                    logit_soft_cap=None, tile: Optional[int] = None) -> jax.Array:
  """The plan's row groups, each one softmax over its key runs; float32 scores and accumulation.

  ``tile`` forces a tile size (tests exercise the grouping at small shapes); default: :func:`plan`'s choice.
  q, k and v are transposed head-major once (``[batch, kv_heads, group, length, head_dim]``), so every group's
  slices are contiguous rows and its dots batch over leading axes: XLA:CPU otherwise copies each group's operands
  into that layout, once per group and again in the backward pass."""
  b, t, h, d = q.shape
  s_len, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  scale = d ** -0.5 if sm_scale is None else sm_scale
  p_lan = plan(mask, t, s_len) if tile is None else _plan_for_tile(mask, t, s_len, int(tile))
  qh = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv_heads, kv_len, head_dim]
  pv_dtype = jnp.float32 if (v.dtype == jnp.float32 or jax.default_backend() == "cpu") else v.dtype
  q_rows = _Pieces(qh, 3, [x for grp in p_lan.groups for x in (grp.row_start, grp.row_stop)])
  key_cuts = [x for grp in p_lan.groups for run in grp.runs for x in (run.start, run.stop)]
  k_runs, v_runs = _Pieces(kh, 2, key_cuts), _Pieces(vh, 2, key_cuts)
  outs, covered = [], 0
  zeros = lambda rows: jnp.zeros((b, kvh, g, rows, d), q.dtype)
  for grp in p_lan.groups:
    if grp.row_start > covered:
      outs.append(zeros(grp.row_start - covered))
    outs.append(_group_attention(q_rows.take(grp.row_start, grp.row_stop), k_runs, v_runs, grp, q_segment_ids,
                                 kv_segment_ids, scale, logit_soft_cap, pv_dtype))
    covered = grp.row_stop
  if covered < t:
    outs.append(zeros(t - covered))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class _Pieces:
  """``x`` cut along ``axis`` at every static boundary in ``cuts`` (one ``lax.split``); :meth:`take` returns
  ``x[start:stop]`` along that axis as the concatenation of the pieces it spans.

  Why not ``x[start:stop]``: the gradient of a slice is a zero-padded array of ``x``'s full size, so the backward
  pass of the plan's overlapping runs (a causal prefix per row group) summed one full-length padded ``dK``/``dV``
  per run, and one padded ``dq`` per row group: on CPU those pads were the largest elementwise cost of the BD3 train
  step. The transpose of ``split`` is a ``concatenate`` and that of ``concatenate`` a set of slices, so each piece's
  gradient is the sum of the runs' slices over that piece only, and ``dx`` is one concatenation."""

  def __init__(self, x, axis: int, cuts):
    n = x.shape[axis]
    self.bounds = sorted({0, n, *(int(c) for c in cuts)})
    sizes = [b - a for a, b in zip(self.bounds, self.bounds[1:])]
    self.parts = jax.lax.split(x, sizes, axis=axis) if len(sizes) > 1 else [x]
    self.axis = axis

  def take(self, start: int, stop: int):
    i, j = self.bounds.index(int(start)), self.bounds.index(int(stop))
    return self.parts[i] if j == i + 1 else jnp.concatenate(self.parts[i:j], axis=self.axis)


def _run_blocks(run: Run, rows: int) -> int:
  """How many aligned diagonal blocks a run splits into: ``rows / period`` for a block-diagonal run (row block i
  sees key block i only), 1 for a plain run (every row may see every key of the run)."""
  return rows // run.period if run.period else 1


def _run_scores(q_rows, k_run, n):
  """``q_rows [b, kvh, g, rows, d]``, ``k_run [b, kvh, width, d]`` -> float32 ``[b, kvh, g, rows, width / n]``:
  rows and keys cut into ``n`` aligned blocks, block i's rows scored against block i's keys only."""
  b, kvh, g, rows, d = q_rows.shape
  sc = jnp.einsum("bkgnid,bknjd->bkgnij", q_rows.reshape(b, kvh, g, n, rows // n, d),
                  k_run.reshape(b, kvh, n, -1, d), preferred_element_type=jnp.float32)
  return sc.reshape(b, kvh, g, rows, -1)


def _run_values(p_run, v_run, n):
  """The transpose of :func:`_run_scores`: ``p_run [b, kvh, g, rows, width / n]`` . ``v_run [b, kvh, width, d]``
  -> float32 ``[b, kvh, g, rows, d]``."""
  b, kvh, g, rows, w = p_run.shape
  o = jnp.einsum("bkgnij,bknjd->bkgnid", p_run.reshape(b, kvh, g, n, rows // n, w),
                 v_run.reshape(b, kvh, n, w, -1), preferred_element_type=jnp.float32)
  return o.reshape(b, kvh, g, rows, -1)


def _group_attention(q_rows, k_runs: _Pieces, v_runs: _Pieces, grp: Group, q_seg, kv_seg, scale, soft_cap,
                     pv_dtype):
  """One row group: ``q_rows [b, kvh, g, rows, d]`` -> ``[b, kvh, g, rows, d]`` (head-major operands, see
  :func:`tiled_attention`); ``k_runs``/``v_runs`` hold ``[b, kvh, kv_len, d]`` cut at the plan's run bounds."""
  b = q_rows.shape[0]
  r0, r1 = grp.row_start, grp.row_stop
  rows = r1 - r0
  scores = [_run_scores(q_rows, k_runs.take(run.start, run.stop), _run_blocks(run, rows)) for run in grp.runs]
  allowed = [_run_allowed(run, r0, rows, q_seg, kv_seg) for run in grp.runs]
  sc = scores[0] if len(scores) == 1 else jnp.concatenate(scores, axis=-1)
  sc = sc * scale
  if soft_cap is not None:
    sc = soft_cap * jnp.tanh(sc / soft_cap)
  ok = _concat_allowed(allowed, [x.shape[-1] for x in scores], b, rows)
  guard = not grp.rows_nonempty or q_seg is not None
  if ok is not None:
    sc = jnp.where(ok[:, None, None], sc, NEG_INF)
  row_max = jax.lax.stop_gradient(jnp.max(sc, axis=-1, keepdims=True))
  if guard:  # a row with no allowed key: exp(NEG_INF - 0) = 0 everywhere, so it outputs 0 (not a uniform average)
    row_max = jnp.where(row_max <= NEG_INF / 2, 0.0, row_max)
  p = jnp.exp(sc - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  if guard:
    denom = jnp.where(denom == 0.0, 1.0, denom)
  p = (p / denom).astype(pv_dtype)
  p_runs = _Pieces(p, -1, itertools.accumulate(sc_run.shape[-1] for sc_run in scores)).parts  # no padded gradients
  out = 0.0
  for run, p_run in zip(grp.runs, p_runs):
    out = out + _run_values(p_run, v_runs.take(run.start, run.stop).astype(pv_dtype), _run_blocks(run, rows))
  return out.astype(q_rows.dtype)


def _run_allowed(run: Run, r0: int, rows: int, q_seg, kv_seg):
  """bool ``[b|1, rows, width]`` for one run, or None when every entry is allowed."""
  ok = None if run.allowed is None else jnp.asarray(run.allowed)[None]
  if q_seg is None:
    return ok
  sq = q_seg[:, r0:r0 + rows]
  sk = kv_seg[:, run.start:run.stop]
  if run.period:
    n, p = rows // run.period, run.period
    seg = masks_lib.segment_predicate(sq.reshape(-1, n, p, 1), sk.reshape(-1, n, 1, p)).reshape(-1, rows, p)
  else:
    seg = masks_lib.segment_predicate(sq[:, :, None], sk[:, None, :])
  return seg if ok is None else ok & seg


def _concat_allowed(parts, widths, b, rows):
  if all(x is None for x in parts):
    return None
  full = [jnp.ones((1, rows, w), bool) if x is None else x for x, w in zip(parts, widths)]
  lead = max(x.shape[0] for x in full)
  full = [jnp.broadcast_to(x, (lead, rows, x.shape[-1])) for x in full]
  return full[0] if len(full) == 1 else jnp.concatenate(full, axis=-1)
