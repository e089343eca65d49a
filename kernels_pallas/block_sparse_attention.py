"""Block-sparse flash attention (forward + backward) in Pallas, for TPU (Mosaic) and GPU (Triton).

``block_sparse_attention(q, k, v, *, mask, ...)`` computes exactly :func:`kernels_pallas.reference.reference_attention`
(no ``q_offsets``/``kv_lengths``: queries and keys start at position 0) but visits only the (query tile, kv tile)
pairs that the static mask does not rule out. Shapes: ``q [b, T, h, d]``, ``k, v [b, S, kvh, d]``, ``kvh | h``
(GQA: query head ``i`` reads kv head ``i // (h // kvh)``).

Sparsity metadata (:mod:`kernels_pallas.block_sparse_metadata`) is built on the host from
``mask.block_classes`` once per static shape: per query tile the non-empty kv tiles (packed left, padded by
repeating the last one), their count, and whether each needs the elementwise predicate (``MASKED``) or not
(``UNMASKED``); the transposed lists drive the dK/dV pass.

TPU (Mosaic)
  ``pltpu.PrefetchScalarGridSpec`` with the metadata as scalar-prefetch (SMEM) operands. Forward and dQ grid
  ``(b, h, q_tiles, fwd_width)``; dK/dV grid ``(b, kvh, kv_tiles, groups, dkv_width)``. The K/V (resp. Q/dO) index
  maps read the listed tile, so padded steps revisit the block already in VMEM (no DMA) and ``pl.when`` skips
  their compute. Online softmax in float32 VMEM scratch (m, l, acc). The dK/dV kernel works on transposed scores
  ``k @ q.T`` so that per-query vectors (logsumexp, delta, query segment ids) are lane rows.
GPU (Triton)
  Grid ``(b, h, q_tiles)`` (forward, dQ) and ``(b, kvh, kv_tiles)`` (dK/dV); each program runs a
  ``lax.fori_loop`` over exactly the listed tiles, reading the tile index from the metadata and loading K/V (Q/dO)
  with ``pl.ds``. Tiles and head_dim must be powers of two (Triton).

Masking on every visited tile: the mask predicate on ``MASKED`` tiles (iota + ``mask.predicate``, or a host-built
table for ``masks.Explicit``), packing ``q_seg == kv_seg != 0`` when segment ids are given, and the internal
padding (lengths that do not divide the tile are padded, then sliced). Rows that see no key output 0 and get
zero gradients (finite ``NEG_INF``; their logsumexp is stored as ``+1e30`` so the backward recomputes ``p = 0``).

Gradients: ``jax.custom_vjp`` saving ``(q, k, v, o, logsumexp)``; ``delta = sum(o * do)`` in XLA; a dQ kernel
and a dK/dV kernel (GQA: the dK/dV kernel reduces over the query heads of its kv head).

``interpret=True`` runs the chosen backend's kernel in an interpreter on any host: TPU → ``pltpu.InterpretParams()``
(or pass an instance), GPU → generic Pallas interpret. ``debug_counter=True`` returns ``(out, visits)`` where
``visits[b, h, q_tile]`` counts the kv tiles the forward kernel actually computed.

This module holds the API, validation, the TPU kernels, the ``custom_vjp`` and the reference;
:mod:`kernels_pallas._block_sparse_gpu` the GPU kernels and :mod:`kernels_pallas._block_sparse_common` the
configuration and tile math both share.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ardiff import masks as masks_lib
from kernels_pallas import common
from kernels_pallas import reference as reference_lib
from kernels_pallas.block_sparse_metadata import MASKED, UNMASKED
from kernels_pallas.common import NEG_INF, online_softmax_step
from kernels_pallas._block_sparse_common import (DEFAULT_BLOCKS, _NT, _Config, _scores, _finalize, _probs, _allowed,
                                                 _cost)
from kernels_pallas._block_sparse_gpu import _gpu_bwd, _gpu_fwd


# ------------------------------------------------------------------------------------------------------------------
# Validation.


def _check_block(backend: str, name: str, block: int, length: int) -> None:
  if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block <= 0:
    raise ValueError(f"{name} must be a positive integer, got {block!r}.")
  if backend == "tpu":
    # Mosaic tiling: a (block, d) tile needs block % 8 == 0 and the per-query/per-key rows (1, block) need
    # block % 128 == 0 unless one tile covers the whole (padded) sequence.
    if block % 128 and not (block >= length and block % 8 == 0):
      raise ValueError(
          f"TPU: {name}={block} must be a multiple of 128 (or a multiple of 8 that covers the whole length "
          f"{length}); e.g. {name}=128.")
  else:
    if not common.is_pow2(block) or block < 16:
      raise ValueError(f"GPU (Triton): {name}={block} must be a power of two >= 16; e.g. {name}=64.")


def _default_block(backend: str, length: int) -> int:
  base = DEFAULT_BLOCKS[backend]
  if backend == "tpu" and length < base:
    return max(8, -(-length // 8) * 8)  # one tile over the whole (short) sequence
  if backend == "gpu" and length < base:
    return max(16, 1 << (length - 1).bit_length())
  return base


def _validate(q, k, v, q_segment_ids, kv_segment_ids, mask, sm_scale, logit_soft_cap):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be [batch, len, heads, head_dim], got shape {getattr(x, 'shape', None)}.")
  b, t, h, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape [batch, kv_len, kv_heads, head_dim].")
  if k.shape[0] != b:
    raise ValueError(f"q batch {b} != k/v batch {k.shape[0]}; pass the same batch size.")
  if k.shape[3] != d:
    raise ValueError(f"q head_dim {d} != k/v head_dim {k.shape[3]}; pass equal head dims.")
  if k.shape[2] == 0 or h % k.shape[2]:
    raise ValueError(f"kv_heads={k.shape[2]} must divide heads={h} (grouped-query attention); use a kv head count "
                     f"that divides {h}.")
  if t == 0 or k.shape[1] == 0:
    raise ValueError(f"q_len={t} and kv_len={k.shape[1]} must be positive.")
  if not (jnp.issubdtype(q.dtype, jnp.floating) and q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("Pass both q_segment_ids and kv_segment_ids, or neither.")
  if q_segment_ids is not None:
    if tuple(q_segment_ids.shape) != (b, t):
      raise ValueError(f"q_segment_ids must be [batch, q_len] = {(b, t)}, got {tuple(q_segment_ids.shape)}.")
    if tuple(kv_segment_ids.shape) != (b, k.shape[1]):
      raise ValueError(f"kv_segment_ids must be [batch, kv_len] = {(b, k.shape[1])}, got "
                       f"{tuple(kv_segment_ids.shape)}.")
    for name, s in (("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)):
      if not jnp.issubdtype(s.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {s.dtype}.")
  if not isinstance(mask, masks_lib.Mask):
    raise ValueError(f"mask must be an ardiff.masks.Mask, got {type(mask).__name__}.")
  if logit_soft_cap is not None and not logit_soft_cap > 0:
    raise ValueError(f"logit_soft_cap must be positive or None, got {logit_soft_cap!r}.")
  if sm_scale is not None and not isinstance(sm_scale, (int, float)):
    raise ValueError(f"sm_scale must be a Python float (static), got {type(sm_scale).__name__}.")



# ------------------------------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels.


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
    q_abs = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_abs = kv_idx_ref[qi, j] * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    s, _ = _scores(q_ref[...], k_ref[...], cfg)
    allowed = _allowed(cfg, q_abs, k_abs, tbl_ref[...] if (masked and cfg.table) else None,
                       qseg_ref[...] if cfg.segments else None, kseg_ref[...] if cfg.segments else None, masked)
    m, l, acc = online_softmax_step(s, allowed, v_ref[...], m_scr[...], l_scr[...], acc_scr[...])
    m_scr[...], l_scr[...], acc_scr[...] = m, l, acc
    if counter:
      cnt_out_ref[bi, hi, qi] += 1

  pl.when(run & (kind == UNMASKED))(lambda: compute(False))
  pl.when(run & (kind == MASKED))(lambda: compute(True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _final():
    o, lse = _finalize(l_scr[...], m_scr[...], acc_scr[...])
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _tpu_segments(cfg: _Config, qseg, kseg, q_map, k_map, transposed: bool = False):
  """(specs, operands) of the query/key segment ids, ``[None, None]`` twice without packing. Query ids are a
  column ``(bq, 1)`` and key ids a row ``(1, bk)`` of the ``[bq, bk]`` score tile (``transposed``: the dK/dV
  kernel's ``[bk, bq]`` tile, ids the other way round)."""
  if not cfg.segments:
    return [None, None], [None, None]
  if transposed:
    return ([pl.BlockSpec((None, 1, cfg.block_q), q_map), pl.BlockSpec((None, cfg.block_kv, 1), k_map)],
            [qseg[:, None, :], kseg[:, :, None]])
  return ([pl.BlockSpec((None, cfg.block_q, 1), q_map), pl.BlockSpec((None, 1, cfg.block_kv), k_map)],
          [qseg[:, :, None], kseg[:, None, :]])


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
  out_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bq, 1), q_map),
               pl.BlockSpec(memory_space=pltpu.SMEM) if counter else None]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp, 1), jnp.float32),
               jax.ShapeDtypeStruct((b, h, nq), jnp.int32) if counter else None]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(b, h, nq, width), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  sem = ("arbitrary",) * 4 if counter else ("parallel", "parallel", "parallel", "arbitrary")
  outs = pl.pallas_call(
      functools.partial(_tpu_fwd_kernel, cfg=cfg), grid_spec=grid_spec, out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=sem),
      cost_estimate=_cost(cfg, b, h, d, q.dtype.itemsize, "fwd"),
      interpret=cfg.interpret_arg, name=f"block_sparse_attention_fwd_tpu_bq{bq}_bk{bk}",
  )(jnp.asarray(meta.fwd_kv_index), jnp.asarray(meta.fwd_kind), jnp.asarray(meta.fwd_count),
    jnp.asarray(meta.fwd_block_id), *operands)
  return outs[0], outs[1][..., 0], outs[2]


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
    q_abs = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_abs = kv_idx_ref[qi, j] * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    k = k_ref[...]
    s, dcap = _scores(q_ref[...], k, cfg)
    allowed = _allowed(cfg, q_abs, k_abs, tbl_ref[...] if (masked and cfg.table) else None,
                       qseg_ref[...] if cfg.segments else None, kseg_ref[...] if cfg.segments else None, masked)
    p = _probs(s, lse_ref[...], allowed)
    dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    if dcap is not None:
      ds = ds * dcap
    dq_scr[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * cfg.sm_scale

  pl.when(run & (kind == UNMASKED))(lambda: compute(False))
  pl.when(run & (kind == MASKED))(lambda: compute(True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _final():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _tpu_dkv_kernel(q_idx_ref, kind_ref, cnt_ref, blk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                    qseg_ref, kseg_ref, tbl_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, cfg: _Config):
  ki, gi, j = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  bq, bk = cfg.block_q, cfg.block_kv

  @pl.when((gi == 0) & (j == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  kind = kind_ref[ki, j]
  run = j < cnt_ref[ki]

  def compute(masked: bool):
    # Transposed orientation [bk, bq]: per-query vectors are lane rows (1, bq).
    k_abs = ki * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    q_abs = q_idx_ref[ki, j] * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
    q, do = q_ref[...], do_ref[...]
    s, dcap = _scores(k_ref[...], q, cfg)
    allowed = _allowed(cfg, q_abs, k_abs, tbl_ref[...] if (masked and cfg.table) else None,
                       qseg_ref[...] if cfg.segments else None, kseg_ref[...] if cfg.segments else None, masked)
    p = _probs(s, lse_ref[...], allowed)
    dv_scr[...] += jnp.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    if dcap is not None:
      ds = ds * dcap
    dk_scr[...] += jnp.dot(ds.astype(q.dtype), q, preferred_element_type=jnp.float32) * cfg.sm_scale

  pl.when(run & (kind == UNMASKED))(lambda: compute(False))
  pl.when(run & (kind == MASKED))(lambda: compute(True))

  @pl.when((gi == pl.num_programs(3) - 1) & (j == pl.num_programs(4) - 1))
  def _final():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _tpu_bwd(cfg: _Config, q, k, v, qseg, kseg, o, lse, do):
  meta = cfg.meta
  b, h, tp, d = q.shape
  kvh = k.shape[1]
  bq, bk, g = cfg.block_q, cfg.block_kv, cfg.groups
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [b, h, Tp]
  interp = cfg.interpret_arg
  itemsize = q.dtype.itemsize

  # dQ: same grid and metadata as the forward.
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
  dq = pl.pallas_call(
      functools.partial(_tpu_dq_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(b, h, nq, wf), in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, bq, d), q_map),
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=_cost(cfg, b, h, d, itemsize, "dq"), interpret=interp,
      name=f"block_sparse_attention_dq_tpu_bq{bq}_bk{bk}",
  )(jnp.asarray(meta.fwd_kv_index), jnp.asarray(meta.fwd_kind), jnp.asarray(meta.fwd_count),
    jnp.asarray(meta.fwd_block_id), *operands)

  # dK/dV: grid over kv tiles, reducing over (query heads of the group, listed query tiles).
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
  dk, dv = pl.pallas_call(
      functools.partial(_tpu_dkv_kernel, cfg=cfg),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=(b, kvh, nk, g, wb), in_specs=in_specs, out_specs=[kv_out, kv_out],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      cost_estimate=_cost(cfg, b, h, d, itemsize, "dkv"), interpret=interp,
      name=f"block_sparse_attention_dkv_tpu_bq{bq}_bk{bk}",
  )(jnp.asarray(meta.dkv_q_index), jnp.asarray(meta.dkv_kind), jnp.asarray(meta.dkv_count),
    jnp.asarray(meta.dkv_block_id), *operands)
  return dq, dk, dv



# ------------------------------------------------------------------------------------------------------------------
# custom_vjp over the padded, head-major layout.


def _fwd_impl(cfg, q, k, v, qseg, kseg, counter=False):
  return (_tpu_fwd if cfg.backend == "tpu" else _gpu_fwd)(cfg, q, k, v, qseg, kseg, counter)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bsa(cfg, q, k, v, qseg, kseg):
  return _fwd_impl(cfg, q, k, v, qseg, kseg)[0]


def _bsa_fwd(cfg, q, k, v, qseg, kseg):
  o, lse, _ = _fwd_impl(cfg, q, k, v, qseg, kseg)
  return o, (q, k, v, qseg, kseg, o, lse)


def _bsa_bwd(cfg, res, do):
  q, k, v, qseg, kseg, o, lse = res
  dq, dk, dv = (_tpu_bwd if cfg.backend == "tpu" else _gpu_bwd)(cfg, q, k, v, qseg, kseg, o, lse, do)
  return dq, dk, dv, None, None


_bsa.defvjp(_bsa_fwd, _bsa_bwd)


# ------------------------------------------------------------------------------------------------------------------
# Public API.


def block_sparse_attention(q, k, v, *, mask: masks_lib.Mask, q_segment_ids=None, kv_segment_ids=None,
                           sm_scale: Optional[float] = None, logit_soft_cap: Optional[float] = None,
                           block_q: Optional[int] = None, block_kv: Optional[int] = None,
                           backend: Optional[str] = None, interpret=False, debug_counter: bool = False):
  """Block-sparse flash attention; same result as :func:`kernels_pallas.reference.reference_attention`.

  Args:
    q: ``[b, T, h, d]``; k, v: ``[b, S, kvh, d]`` with ``kvh | h``. One floating dtype.
    mask: a static :class:`ardiff.masks.Mask` over absolute positions ``0..T-1`` × ``0..S-1``.
    q_segment_ids, kv_segment_ids: optional int ``[b, T]`` / ``[b, S]``; 0 is padding (packing).
    sm_scale: logit scale (default ``d ** -0.5``). logit_soft_cap: optional ``cap * tanh(logits / cap)``.
    block_q, block_kv: tile sizes (default TPU 128, GPU 64; short sequences use one tile). Lengths need not divide.
    backend: ``"tpu"`` (Mosaic), ``"gpu"`` (Triton) or None (``jax.default_backend()``).
    interpret: run the backend's kernel in the Pallas interpreter (TPU: ``pltpu.InterpretParams``).
    debug_counter: return ``(out, visits)`` with ``visits: int32[b, h, q_tiles]`` = kv tiles computed by the
      forward kernel (not differentiable).

  Returns:
    ``[b, T, h, d]`` in q's dtype (or ``(out, visits)`` with ``debug_counter``). Differentiable w.r.t. q, k, v.
  """
  _validate(q, k, v, q_segment_ids, kv_segment_ids, mask, sm_scale, logit_soft_cap)
  backend = common.resolve_backend(backend, interpret, kernel="block-sparse attention")
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  if backend == "gpu" and not common.is_pow2(d):
    raise ValueError(f"GPU (Triton): head_dim={d} must be a power of two; pad the head dim or use backend='tpu'.")
  bq = _default_block(backend, t) if block_q is None else block_q
  bk = _default_block(backend, s) if block_kv is None else block_kv
  _check_block(backend, "block_q", bq, t)
  _check_block(backend, "block_kv", bk, s)
  segments = q_segment_ids is not None
  cfg = _Config(mask=mask, q_len=t, kv_len=s, block_q=int(bq), block_kv=int(bk), groups=h // kvh,
                sm_scale=float(d ** -0.5 if sm_scale is None else sm_scale),
                logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap), backend=backend,
                interpret=interpret, table=not common.predicate_runs_in_kernel(mask), segments=segments)
  meta = cfg.meta
  tp, sp = meta.padded_q_len, meta.padded_kv_len
  with jax.named_scope("block_sparse_attention"):
    qh = jnp.pad(jnp.swapaxes(q, 1, 2), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    kh = jnp.pad(jnp.swapaxes(k, 1, 2), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    vh = jnp.pad(jnp.swapaxes(v, 1, 2), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    qseg = kseg = None
    if segments:  # padded positions get segment 0 (= padding, never attends or is attended)
      qseg = jnp.pad(jnp.asarray(q_segment_ids, jnp.int32), ((0, 0), (0, tp - t)))
      kseg = jnp.pad(jnp.asarray(kv_segment_ids, jnp.int32), ((0, 0), (0, sp - s)))
    if debug_counter:
      o, _, visits = _fwd_impl(cfg, qh, kh, vh, qseg, kseg, counter=True)
    else:
      o = _bsa(cfg, qh, kh, vh, qseg, kseg)
    out = jnp.swapaxes(o[:, :, :t], 1, 2)
  return (out, visits) if debug_counter else out


def block_sparse_attention_reference(q, k, v, *, mask: masks_lib.Mask, q_segment_ids=None, kv_segment_ids=None,
                                     sm_scale: Optional[float] = None, logit_soft_cap: Optional[float] = None,
                                     block_q: Optional[int] = None, block_kv: Optional[int] = None,
                                     backend: Optional[str] = None, interpret=False, debug_counter: bool = False):
  """Pure-JAX dense reference with the kernel's signature (tiling/backend arguments are accepted and ignored).

  With ``debug_counter`` it returns ``(out, visits)`` where ``visits`` is the number of non-empty tiles per query
  tile from the metadata (what the kernel must visit).
  """
  del backend, interpret
  _validate(q, k, v, q_segment_ids, kv_segment_ids, mask, sm_scale, logit_soft_cap)
  out = reference_lib.reference_attention(q, k, v, mask=mask, q_segment_ids=q_segment_ids,
                                         kv_segment_ids=kv_segment_ids, sm_scale=sm_scale,
                                         logit_soft_cap=logit_soft_cap)
  if not debug_counter:
    return out
  b, t, h, _ = q.shape
  bq = block_q or DEFAULT_BLOCKS["tpu"]
  bk = block_kv or DEFAULT_BLOCKS["tpu"]
  classes = mask.block_classes(t, k.shape[1], block_q=bq, block_kv=bk)
  visits = np.broadcast_to((classes != masks_lib.EMPTY).sum(axis=1).astype(np.int32), (b, h, classes.shape[0]))
  return out, jnp.asarray(visits)
