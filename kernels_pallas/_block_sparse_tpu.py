"""TPU (Mosaic) kernels of :func:`kernels_pallas.block_sparse_attention.block_sparse_attention`.

``pltpu.PrefetchScalarGridSpec`` with the metadata as scalar-prefetch (SMEM) operands. Forward and dQ grid
``(b, h, q_tiles, fwd_width)``; dK/dV grid ``(b, kvh, kv_tiles, groups, dkv_width)``, which also accumulates dQ
when the whole-sequence dQ fits VMEM (then no dQ pass runs). The K/V (resp. Q/dO) index
maps read the listed tile, so padded steps revisit the block already in VMEM (no DMA) and ``pl.when`` skips
their compute. Online softmax in float32 VMEM scratch (m, l, acc). The dK/dV kernel works on transposed scores
``k @ q.T`` so that per-query vectors (logsumexp, delta, query segment ids) are lane rows. The layout, masking and
gradient conventions are described in :mod:`kernels_pallas.block_sparse_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.block_sparse_metadata import MASKED, UNMASKED
from kernels_pallas.common import NEG_INF
from kernels_pallas._block_sparse_common import _NT, _TN, _Config, _scores, _finalize, _probs, _allowed, _cost


# ------------------------------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels.

LANES = 128  # the vreg lane count: per-row softmax statistics are kept replicated across one vreg row


def _lanes(x, n: int):
  """A lane-replicated ``[rows, 128]`` statistic as ``[rows, n]`` (tile, slice or broadcast; no data movement for
  n == 128)."""
  if n == LANES:
    return x
  if n % LANES == 0:
    return jnp.tile(x, (1, n // LANES))
  if n < LANES:
    return x[:, :n]
  return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


def _softmax_step(s, allowed, v, m_prev, l_prev, acc_prev):
  """Online-softmax step with lane-replicated statistics: ``m_prev``/``l_prev`` are f32 ``[bq, 128]`` (every lane of
  a row holds the same value), ``s`` f32 ``[bq, bk]``, ``acc_prev`` f32 ``[bq, d]``. Kept as ``[bq, 1]`` columns the
  running max and sum need a lane broadcast before every use and lengthen the dependency chain of each tile; as
  full vreg rows they combine with the tile elementwise. Masked entries contribute an exact 0."""
  bk, d = s.shape[1], acc_prev.shape[1]
  if allowed is not None:
    s = jnp.where(allowed, s, NEG_INF)
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))  # [bq, 128]
  # A row with no allowed key so far has m_new == NEG_INF, where exp(s - m_new) would be 1 for its masked
  # entries; shifting such rows by 0 instead makes them exp(NEG_INF) == 0 exactly. One select per row instead of a
  # second select over the whole [bq, bk] tile.
  m_shift = m_new if allowed is None else jnp.where(m_new == NEG_INF, 0.0, m_new)
  p = jnp.exp(s - _lanes(m_shift, bk))
  alpha = jnp.exp(m_prev - m_new)
  l_new = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
  acc_new = _lanes(alpha, d) * acc_prev + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return m_new, l_new, acc_new


def _tpu_fwd_kernel(kv_idx_ref, kind_ref, cnt_ref, blk_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, tbl_ref,
                    o_ref, lse_ref, cnt_out_ref, m_scr, l_scr, acc_scr, *, cfg: _Config):
  """Absent operands (segment ids, mask table, visit counter) arrive as None (None block spec)."""
  counter = cnt_out_ref is not None
  bi, hi, qi, j = (pl.program_id(i) for i in range(4))
  bq, bk = cfg.block_q, cfg.block_kv

  @pl.when(j == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
    if counter:
      cnt_out_ref[bi, hi, qi] = 0

  kind = kind_ref[qi, j]
  run = j < cnt_ref[qi]

  def compute(masked: bool):
    # Positions as a column and a row: the mask's integer arithmetic (divisions by the block size) runs on
    # vectors; only its final comparisons broadcast to the [bq, bk] tile.
    q_abs = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_abs = kv_idx_ref[qi, j] * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    s, _ = _scores(q_ref[...], k_ref[...], cfg)
    allowed = _allowed(cfg, q_abs, k_abs, tbl_ref[...] if (masked and cfg.table) else None,
                       _lanes(qseg_ref[...], bk) if cfg.segments else None,
                       kseg_ref[...] if cfg.segments else None, masked)
    m, l, acc = _softmax_step(s, allowed, v_ref[...], m_scr[...], l_scr[...], acc_scr[...])
    m_scr[...], l_scr[...], acc_scr[...] = m, l, acc
    if counter:
      cnt_out_ref[bi, hi, qi] += 1

  pl.when(run & (kind == UNMASKED))(lambda: compute(False))
  pl.when(run & (kind == MASKED))(lambda: compute(True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _final():
    l, m = l_scr[...][:, :1], m_scr[...][:, :1]
    o, lse = _finalize(l, m, acc_scr[...])
    o_ref[...] = o.astype(o_ref.dtype)
    # Stored as a lane-dense row (1, bq): a (bq, 1) column block lands in HBM padded to 128 lanes (128x the bytes),
    # and slicing it back cost the train step an XLA reduce over the padded array (3.8 M cycles per step,
    # configs/bd3_1b_tpu.py on v5p). One XLU transpose per query tile.
    lse_ref[...] = jnp.transpose(jnp.broadcast_to(lse, (lse.shape[0], LANES)))[:1]


def _smem_tables(index, kind, count, block_id):
  """The scalar-prefetch (SMEM) metadata, all int32. Narrower tables (kinds int8, counts int16) compile but cost
  more per grid step: Mosaic compares only 32-bit scalars, and the widening of each sub-word SMEM load added 14
  (forward) and 18 (dK/dV) bundles of per-step overhead on v5e (BD3, T = 4096, 512 tiles: 0.841 -> 0.85 Mcycles).
  SMEM (1 MiB per core on v4 and later) holds ``4 x tiles x width`` words per pass: 64 KiB at T = 32k, 512 tiles."""
  return tuple(jnp.asarray(x, jnp.int32) for x in (index, kind, count, block_id))


def _tpu_segments(cfg: _Config, qseg, kseg, q_map, k_map, transposed: bool = False):
  """(specs, operands) of the query/key segment ids, ``[None, None]`` twice without packing. Query ids are a
  column ``(bq, 1)`` and key ids a row ``(1, bk)`` of the ``[bq, bk]`` score tile (``transposed``: the dK/dV
  kernel's ``[bk, bq]`` tile, ids the other way round)."""
  if not cfg.segments:
    return [None, None], [None, None]
  # The column operand is lane-replicated [len, 128] (like the softmax statistics): a [n, 1] column would need a
  # lane broadcast on every tile.
  lanes = lambda ids: jnp.broadcast_to(ids[:, :, None], ids.shape + (LANES,))
  if transposed:
    return ([pl.BlockSpec((None, 1, cfg.block_q), q_map), pl.BlockSpec((None, cfg.block_kv, LANES), k_map)],
            [qseg[:, None, :], lanes(kseg)])
  return ([pl.BlockSpec((None, cfg.block_q, LANES), q_map), pl.BlockSpec((None, 1, cfg.block_kv), k_map)],
          [lanes(qseg), kseg[:, None, :]])


def _tpu_table(cfg: _Config, block_map, transposed: bool):
  """(spec, operand) of the host-built mask tiles (table masks only; else ``(None, None)``)."""
  if not cfg.table:
    return None, None
  blocks = cfg.meta.partial_blocks
  if transposed:
    blocks = np.ascontiguousarray(blocks.transpose(0, 2, 1))
  return pl.BlockSpec((None,) + blocks.shape[1:], block_map), jnp.asarray(blocks)


def _tpu_fwd(cfg: _Config, q, k, v, qseg, kseg, counter: bool):
  """q [b, h, Tp, d], k/v [b, kvh, Sp, d], qseg [b, Tp], kseg [b, Sp] → o [b,h,Tp,d], lse [b,h,Tp] (, visits)."""
  meta = cfg.meta
  b, h, tp, d = q.shape
  bq, bk, g = cfg.block_q, cfg.block_kv, cfg.groups
  nq, width = meta.num_q_tiles, meta.fwd_width

  q_map = lambda bi, hi, qi, j, idx, kind, cnt, blk: (bi, hi, qi, 0)
  kv_map = lambda bi, hi, qi, j, idx, kind, cnt, blk: (bi, hi // g, idx[qi, j], 0)
  seg_specs, seg_operands = _tpu_segments(cfg, qseg, kseg, lambda bi, hi, qi, j, *_: (bi, qi, 0),
                                           lambda bi, hi, qi, j, idx, *_: (bi, 0, idx[qi, j]))
  tbl_spec, tbl = _tpu_table(cfg, lambda bi, hi, qi, j, idx, kind, cnt, blk: (blk[qi, j], 0, 0), False)
  in_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map), *seg_specs, tbl_spec]
  operands = [q, k, v, *seg_operands, tbl]
  row_map = lambda bi, hi, qi, j, *_: (bi, hi, 0, qi)
  out_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, 1, bq), row_map),
               pl.BlockSpec(memory_space=pltpu.SMEM) if counter else None]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, 1, tp), jnp.float32),
               jax.ShapeDtypeStruct((b, h, nq), jnp.int32) if counter else None]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(b, h, nq, width), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  sem = ("arbitrary",) * 4 if counter else ("parallel", "parallel", "parallel", "arbitrary")
  outs = pl.pallas_call(
      functools.partial(_tpu_fwd_kernel, cfg=cfg), grid_spec=grid_spec, out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=sem),
      cost_estimate=_cost(cfg, b, h, d, q.dtype.itemsize, "fwd"),
      interpret=cfg.interpret_arg, name=f"block_sparse_attention_fwd_tpu_bq{bq}_bk{bk}",
  )(*_smem_tables(meta.fwd_kv_index, meta.fwd_kind, meta.fwd_count, meta.fwd_block_id), *operands)
  return outs[0], outs[1][:, :, 0], outs[2]


def _tpu_dq_kernel(kv_idx_ref, kind_ref, cnt_ref, blk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
                   kseg_ref, tbl_ref, dq_ref, dq_scr, *, cfg: _Config):
  qi, j = pl.program_id(2), pl.program_id(3)
  bq, bk = cfg.block_q, cfg.block_kv

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  kind = kind_ref[qi, j]
  run = j < cnt_ref[qi]

  def compute(masked: bool):
    # Positions as a column and a row: the mask's integer arithmetic (divisions by the block size) runs on
    # vectors; only its final comparisons broadcast to the [bq, bk] tile.
    q_abs = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_abs = kv_idx_ref[qi, j] * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    k = k_ref[...]
    s, dcap = _scores(q_ref[...], k, cfg)
    allowed = _allowed(cfg, q_abs, k_abs, tbl_ref[...] if (masked and cfg.table) else None,
                       _lanes(qseg_ref[...], bk) if cfg.segments else None,
                       kseg_ref[...] if cfg.segments else None, masked)
    p = _probs(s, lse_ref[...], allowed)
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    if dcap is not None:
      ds = ds * dcap
    dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  pl.when(run & (kind == UNMASKED))(lambda: compute(False))
  pl.when(run & (kind == MASKED))(lambda: compute(True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _final():
    dq_ref[...] = (dq_scr[...] * cfg.sm_scale).astype(dq_ref.dtype)  # the scale once, not per tile


def _tpu_dkv_kernel(q_idx_ref, kind_ref, cnt_ref, blk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                    qseg_ref, kseg_ref, tbl_ref, dk_ref, dv_ref, dq_ref, dk_scr, dv_scr, dq_scr, *, cfg: _Config):
  """dK/dV (and, fused, dQ) of one kv tile. ``dq_ref``/``dq_scr`` are None without the fused dQ; with it they hold
  the dQ of every query head of the kv head over the whole padded sequence, ``[groups, Tp, d]``, accumulated
  across kv tiles and written once per (batch, kv head)."""
  ki, gi, j = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  bq, bk = cfg.block_q, cfg.block_kv
  fused = dq_ref is not None
  last_g, last_j = pl.num_programs(3) - 1, pl.num_programs(4) - 1

  @pl.when((gi == 0) & (j == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  if fused:
    @pl.when((ki == 0) & (gi == 0) & (j == 0))
    def _init_dq():
      dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  kind = kind_ref[ki, j]
  run = j < cnt_ref[ki]

  def compute(masked: bool):
    # Transposed orientation [bk, bq]: per-query vectors are lane rows (1, bq).
    qt = q_idx_ref[ki, j]
    k_abs = ki * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    q_abs = qt * bq + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
    q, do, k = q_ref[...], do_ref[...], k_ref[...]
    s, dcap = _scores(k, q, cfg)
    allowed = _allowed(cfg, q_abs, k_abs, tbl_ref[...] if (masked and cfg.table) else None,
                       qseg_ref[...] if cfg.segments else None,
                       _lanes(kseg_ref[...], bq) if cfg.segments else None, masked)
    p = _probs(s, lse_ref[...], allowed)
    dv_scr[...] += jnp.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    if dcap is not None:
      ds = ds * dcap
    ds = ds.astype(q.dtype)
    # sm_scale is applied once when the accumulators are written out, not per tile.
    dk_scr[...] += jnp.dot(ds, q, preferred_element_type=jnp.float32)
    if fused:
      # dQ of this query tile += ds.T @ k (contract the kv axis of both): the fourth matmul of the tile replaces
      # a separate dQ pass, which would recompute the scores and dP (three matmuls) per tile.
      rows = pl.ds(pl.multiple_of(qt * bq, bq), bq)
      dq_scr[gi, rows, :] += lax.dot_general(ds, k, _TN, preferred_element_type=jnp.float32)

  pl.when(run & (kind == UNMASKED))(lambda: compute(False))
  pl.when(run & (kind == MASKED))(lambda: compute(True))

  @pl.when((gi == last_g) & (j == last_j))
  def _final():
    dk_ref[...] = (dk_scr[...] * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)

  if fused:
    @pl.when((ki == pl.num_programs(2) - 1) & (gi == last_g) & (j == last_j))
    def _final_dq():
      dq_ref[...] = (dq_scr[...] * cfg.sm_scale).astype(dq_ref.dtype)


# The fused backward keeps dQ of a whole (batch, kv head) in VMEM: an f32 accumulator plus the double-buffered output
# block (head dims below 128 take 128 lanes). It is used up to a quarter of the core's VMEM (v5e/v6e 128 MiB, v5p
# 64 MiB, v4 16 MiB; off-TPU, as in interpret mode, 16 MiB is assumed); beyond, a separate dQ pass runs (it
# recomputes the scores and dP per tile). ``FUSED_DQ_MAX_BYTES`` overrides that budget when set.
FUSED_DQ_MAX_BYTES = None
_DEFAULT_SCOPED_VMEM = 16 << 20  # the smallest default scoped-VMEM limit among v4/v5e/v5p/v6e


def fused_dq_bytes(groups: int, padded_q_len: int, head_dim: int, itemsize: int) -> int:
  lanes = -(-head_dim // LANES) * LANES
  return groups * padded_q_len * lanes * (4 + 2 * itemsize)


def _vmem_capacity() -> int:
  try:
    return int(pltpu.get_tpu_info().vmem_capacity_bytes)
  except Exception:  # noqa: BLE001 - not targeting a TPU (interpret mode on CPU): assume the smallest
    return 16 << 20


def _fused_dq_plan(groups: int, padded_q_len: int, head_dim: int, itemsize: int):
  """(fuse dQ into the dK/dV pass?, vmem_limit_bytes for that call or None for the default)."""
  need = fused_dq_bytes(groups, padded_q_len, head_dim, itemsize)
  capacity = _vmem_capacity()
  budget = capacity // 4 if FUSED_DQ_MAX_BYTES is None else FUSED_DQ_MAX_BYTES
  if need > budget:
    return False, None
  # Tiles, their double buffers and Mosaic's internal scratch take up to ~8 MiB at 512 tiles; raise the limit only
  # when the accumulator would crowd the default one.
  if need + (8 << 20) <= _DEFAULT_SCOPED_VMEM:
    return True, None
  return True, min(capacity * 3 // 4, need + (16 << 20))


def _tpu_dq(cfg: _Config, q, k, v, qseg, kseg, lse, delta, do):
  """Separate dQ pass (same grid and metadata as the forward); only where the fused dQ does not fit VMEM."""
  meta = cfg.meta
  b, h, tp, d = q.shape
  bq, bk, g = cfg.block_q, cfg.block_kv, cfg.groups
  nq, wf = meta.num_q_tiles, meta.fwd_width
  q_map = lambda bi, hi, qi, j, *_: (bi, hi, qi, 0)
  kv_map = lambda bi, hi, qi, j, idx, *_: (bi, hi // g, idx[qi, j], 0)
  seg_specs, seg_operands = _tpu_segments(cfg, qseg, kseg, lambda bi, hi, qi, j, *_: (bi, qi, 0),
                                           lambda bi, hi, qi, j, idx, *_: (bi, 0, idx[qi, j]))
  tbl_spec, tbl = _tpu_table(cfg, lambda bi, hi, qi, j, idx, kind, cnt, blk: (blk[qi, j], 0, 0), False)
  in_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map), pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bq, 1), q_map), pl.BlockSpec((None, None, bq, 1), q_map), *seg_specs,
              tbl_spec]
  operands = [q, k, v, do, lse[..., None], delta[..., None], *seg_operands, tbl]
  return pl.pallas_call(
      functools.partial(_tpu_dq_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(b, h, nq, wf), in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, bq, d), q_map),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=_cost(cfg, b, h, d, q.dtype.itemsize, "dq"), interpret=cfg.interpret_arg,
      name=f"block_sparse_attention_dq_tpu_bq{bq}_bk{bk}",
  )(*_smem_tables(meta.fwd_kv_index, meta.fwd_kind, meta.fwd_count, meta.fwd_block_id), *operands)


def _tpu_bwd(cfg: _Config, q, k, v, qseg, kseg, o, lse, do):
  """(dq, dk, dv). One pass over the kv tiles computes dK/dV and, when its whole-sequence accumulator fits VMEM
  (:func:`_fused_dq_plan`), dQ too; otherwise dQ runs as a separate pass."""
  meta = cfg.meta
  b, h, tp, d = q.shape
  kvh = k.shape[1]
  bq, bk, g = cfg.block_q, cfg.block_kv, cfg.groups
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [b, h, Tp]
  fused, vmem_limit = _fused_dq_plan(g, tp, d, q.dtype.itemsize)

  # Grid over kv tiles, reducing over (query heads of the group, listed query tiles).
  nk, wb = meta.num_kv_tiles, meta.dkv_width
  qh_map = lambda bi, kh, ki, gi, j, idx, *_: (bi, kh * g + gi, idx[ki, j], 0)
  row_map = lambda bi, kh, ki, gi, j, idx, *_: (bi, kh * g + gi, 0, idx[ki, j])
  k_map = lambda bi, kh, ki, gi, j, *_: (bi, kh, ki, 0)
  seg_specs, seg_operands = _tpu_segments(cfg, qseg, kseg,
                                           lambda bi, kh, ki, gi, j, idx, *_: (bi, 0, idx[ki, j]),
                                           lambda bi, kh, ki, gi, j, *_: (bi, ki, 0), transposed=True)
  tbl_spec, tbl = _tpu_table(cfg, lambda bi, kh, ki, gi, j, idx, kind, cnt, blk: (blk[ki, j], 0, 0), True)
  in_specs = [pl.BlockSpec((None, None, bq, d), qh_map), pl.BlockSpec((None, None, bk, d), k_map),
              pl.BlockSpec((None, None, bk, d), k_map), pl.BlockSpec((None, None, bq, d), qh_map),
              pl.BlockSpec((None, None, 1, bq), row_map), pl.BlockSpec((None, None, 1, bq), row_map), *seg_specs,
              tbl_spec]
  operands = [q, k, v, do, lse[:, :, None, :], delta[:, :, None, :], *seg_operands, tbl]
  kv_out = pl.BlockSpec((None, None, bk, d), k_map)
  out_specs = [kv_out, kv_out, None]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype), None]
  scratch = [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32), None]
  # Without the fused dQ, kv tiles are independent (megacore may split them); with it, they all add into one dQ.
  sem = ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
  if fused:
    # dQ of the g query heads of one kv head as one resident [g, Tp, d] block (heads kh * g + gi are adjacent).
    out_specs[2] = pl.BlockSpec((None, None, g, tp, d), lambda bi, kh, *_: (bi, kh, 0, 0, 0))
    out_shape[2] = jax.ShapeDtypeStruct((b, kvh, g, tp, d), q.dtype)
    scratch[2] = pltpu.VMEM((g, tp, d), jnp.float32)
    sem = ("parallel", "parallel", "arbitrary", "arbitrary", "arbitrary")
  dk, dv, dq = pl.pallas_call(
      functools.partial(_tpu_dkv_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(b, kvh, nk, g, wb), in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=sem, vmem_limit_bytes=vmem_limit),
      cost_estimate=_cost(cfg, b, h, d, q.dtype.itemsize, "dkv_dq" if fused else "dkv"),
      interpret=cfg.interpret_arg, name=f"block_sparse_attention_dkv_tpu_bq{bq}_bk{bk}",
  )(*_smem_tables(meta.dkv_q_index, meta.dkv_kind, meta.dkv_count, meta.dkv_block_id), *operands)
  if fused:
    dq = dq.reshape(q.shape)
  else:
    dq = _tpu_dq(cfg, q, k, v, qseg, kseg, lse, delta, do)
  return dq, dk, dv
