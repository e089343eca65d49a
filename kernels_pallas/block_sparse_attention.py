"""Block-sparse flash attention (forward + backward) in Pallas, for TPU (Mosaic) and GPU (Triton).

``block_sparse_attention(q, k, v, *, mask, ...)`` computes exactly :func:`ardiff.attention.reference_attention`
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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from ardiff import attention as attention_lib
from ardiff import masks as masks_lib
from kernels_pallas import block_sparse_metadata as meta_lib
from kernels_pallas.block_sparse_metadata import MASKED, UNMASKED

NEG_INF = -1e30      # finite: fully masked rows never produce inf - inf
EMPTY_ROW_LSE = 1e30  # logsumexp stored for rows with no allowed key: exp(s - lse) == 0 in the backward
BACKENDS = ("tpu", "gpu")
DEFAULT_BLOCKS = {"tpu": 128, "gpu": 64}
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


# ------------------------------------------------------------------------------------------------------------------
# Configuration and validation.


@dataclasses.dataclass(frozen=True)
class _Config:
  mask: masks_lib.Mask
  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  groups: int
  sm_scale: float
  logit_soft_cap: Optional[float]
  backend: str
  interpret: Any  # False | True | pltpu.InterpretParams
  table: bool
  segments: bool

  @property
  def meta(self) -> meta_lib.BlockSparseMetadata:
    return meta_lib.build_metadata(self.mask, self.q_len, self.kv_len, self.block_q, self.block_kv, self.table)

  @property
  def interpret_arg(self):
    if not self.interpret:
      return False
    if self.backend == "tpu":
      return self.interpret if isinstance(self.interpret, pltpu.InterpretParams) else pltpu.InterpretParams()
    return True


def _resolve_backend(backend: Optional[str], interpret) -> str:
  if backend is None:
    backend = jax.default_backend()
    if backend not in BACKENDS:
      raise ValueError(
          f"block_sparse_attention runs on TPU or GPU, but jax.default_backend() is {backend!r}; on this host pass "
          f"backend='tpu' or backend='gpu' together with interpret=True to run that kernel in the interpreter.")
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None (jax.default_backend()), got {backend!r}.")
  if isinstance(interpret, pltpu.InterpretParams) and backend != "tpu":
    raise ValueError("interpret=pltpu.InterpretParams(...) is for backend='tpu'; use interpret=True for 'gpu'.")
  return backend


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


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
    if not _is_pow2(block) or block < 16:
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
# Tile math shared by both backends. Shapes: s is [rows, cols] f32.


def _scores(a, b, cfg: _Config):
  """``a @ b.T * scale`` in f32 with the optional soft cap; returns (capped scores, d capped / d raw or None)."""
  s = lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32) * cfg.sm_scale
  if cfg.logit_soft_cap is None:
    return s, None
  t = jnp.tanh(s / cfg.logit_soft_cap)
  return cfg.logit_soft_cap * t, 1.0 - t * t


def _online_softmax_step(s, allowed, v, m_prev, l_prev, acc_prev):
  if allowed is not None:
    s = jnp.where(allowed, s, NEG_INF)
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - m_new)
  if allowed is not None:
    p = jnp.where(allowed, p, 0.0)
  alpha = jnp.exp(m_prev - m_new)
  l_new = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
  acc_new = alpha * acc_prev + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return m_new, l_new, acc_new


def _finalize(l, m, acc):
  empty = l == 0.0
  o = acc / jnp.where(empty, 1.0, l)
  lse = jnp.where(empty, EMPTY_ROW_LSE, m + jnp.log(jnp.where(empty, 1.0, l)))
  return o, lse


def _probs(s, lse, allowed):
  p = jnp.exp(s - lse)
  return p if allowed is None else jnp.where(allowed, p, 0.0)


def _allowed(cfg: _Config, q_abs, k_abs, tbl, qseg, kseg, masked):
  """Elementwise allowed for one tile; ``masked`` False → only the packing term (or None)."""
  allowed = None
  if masked:
    if cfg.table:
      allowed = tbl != 0
    else:
      allowed = (q_abs < cfg.q_len) & (k_abs < cfg.kv_len) & cfg.mask.predicate(q_abs, k_abs)
  if cfg.segments:
    seg = masks_lib.segment_predicate(qseg, kseg)
    allowed = seg if allowed is None else allowed & seg
  return allowed


def _cost(cfg: _Config, b, h, d, itemsize, pass_: str) -> pl.CostEstimate:
  tiles = cfg.meta.num_nonempty
  elems = b * h * tiles * cfg.block_q * cfg.block_kv
  mm = {"fwd": 2, "dq": 3, "dkv": 4}[pass_]
  tq, tk = cfg.meta.padded_q_len, cfg.meta.padded_kv_len
  nbytes = itemsize * b * h * d * (2 * tq + 2 * tk * (cfg.meta.fwd_width if pass_ != "dkv" else 1))
  return pl.CostEstimate(flops=2 * mm * elems * d, transcendentals=elems, bytes_accessed=int(nbytes))


# ------------------------------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels.


def _tpu_fwd_kernel(kv_idx_ref, kind_ref, cnt_ref, blk_ref, *refs, cfg: _Config, counter: bool):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  rest = refs[3:]
  qseg_ref = kseg_ref = tbl_ref = cnt_out_ref = None
  if cfg.segments:
    qseg_ref, kseg_ref, rest = rest[0], rest[1], rest[2:]
  if cfg.table:
    tbl_ref, rest = rest[0], rest[1:]
  o_ref, lse_ref, rest = rest[0], rest[1], rest[2:]
  if counter:
    cnt_out_ref, rest = rest[0], rest[1:]
  m_scr, l_scr, acc_scr = rest
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
    m, l, acc = _online_softmax_step(s, allowed, v_ref[...], m_scr[...], l_scr[...], acc_scr[...])
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


def _tpu_seg_specs(cfg, q_map_col, k_map_row):
  return [pl.BlockSpec((None, cfg.block_q, 1), q_map_col), pl.BlockSpec((None, 1, cfg.block_kv), k_map_row)]


def _tpu_fwd(cfg: _Config, q, k, v, qseg, kseg, counter: bool):
  """q [b, h, Tp, d], k/v [b, kvh, Sp, d], qseg [b, Tp], kseg [b, Sp] → o [b,h,Tp,d], lse [b,h,Tp] (, visits)."""
  meta = cfg.meta
  b, h, tp, d = q.shape
  bq, bk, g = cfg.block_q, cfg.block_kv, cfg.groups
  nq, width = meta.num_q_tiles, meta.fwd_width

  q_map = lambda bi, hi, qi, j, idx, kind, cnt, blk: (bi, hi, qi, 0)
  kv_map = lambda bi, hi, qi, j, idx, kind, cnt, blk: (bi, hi // g, idx[qi, j], 0)
  in_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map)]
  operands = [q, k, v]
  if cfg.segments:
    in_specs += _tpu_seg_specs(cfg, lambda bi, hi, qi, j, idx, kind, cnt, blk: (bi, qi, 0),
                               lambda bi, hi, qi, j, idx, kind, cnt, blk: (bi, 0, idx[qi, j]))
    operands += [qseg[:, :, None], kseg[:, None, :]]
  if cfg.table:
    in_specs.append(pl.BlockSpec((None, bq, bk), lambda bi, hi, qi, j, idx, kind, cnt, blk: (blk[qi, j], 0, 0)))
    operands.append(jnp.asarray(meta.partial_blocks))
  out_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bq, 1), q_map)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp, 1), jnp.float32)]
  if counter:
    out_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    out_shape.append(jax.ShapeDtypeStruct((b, h, nq), jnp.int32))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4, grid=(b, h, nq, width), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  sem = ("arbitrary",) * 4 if counter else ("parallel", "parallel", "parallel", "arbitrary")
  outs = pl.pallas_call(
      functools.partial(_tpu_fwd_kernel, cfg=cfg, counter=counter), grid_spec=grid_spec, out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=sem),
      cost_estimate=_cost(cfg, b, h, d, q.dtype.itemsize, "fwd"),
      interpret=cfg.interpret_arg, name=f"block_sparse_attention_fwd_tpu_bq{bq}_bk{bk}",
  )(jnp.asarray(meta.fwd_kv_index), jnp.asarray(meta.fwd_kind), jnp.asarray(meta.fwd_count),
    jnp.asarray(meta.fwd_block_id), *operands)
  o, lse = outs[0], outs[1][..., 0]
  return (o, lse, outs[2]) if counter else (o, lse, None)


def _tpu_dq_kernel(kv_idx_ref, kind_ref, cnt_ref, blk_ref, *refs, cfg: _Config):
  refs = list(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  rest = refs[6:]
  qseg_ref = kseg_ref = tbl_ref = None
  if cfg.segments:
    qseg_ref, kseg_ref, rest = rest[0], rest[1], rest[2:]
  if cfg.table:
    tbl_ref, rest = rest[0], rest[1:]
  dq_ref, dq_scr = rest
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


def _tpu_dkv_kernel(q_idx_ref, kind_ref, cnt_ref, blk_ref, *refs, cfg: _Config):
  refs = list(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  rest = refs[6:]
  qseg_ref = kseg_ref = tbl_ref = None
  if cfg.segments:
    qseg_ref, kseg_ref, rest = rest[0], rest[1], rest[2:]
  if cfg.table:
    tbl_ref, rest = rest[0], rest[1:]
  dk_ref, dv_ref, dk_scr, dv_scr = rest
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
  in_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map), pl.BlockSpec((None, None, bq, d), q_map),
              pl.BlockSpec((None, None, bq, 1), q_map), pl.BlockSpec((None, None, bq, 1), q_map)]
  operands = [q, k, v, do, lse[..., None], delta[..., None]]
  if cfg.segments:
    in_specs += _tpu_seg_specs(cfg, lambda bi, hi, qi, j, *_: (bi, qi, 0),
                               lambda bi, hi, qi, j, idx, *_: (bi, 0, idx[qi, j]))
    operands += [qseg[:, :, None], kseg[:, None, :]]
  if cfg.table:
    in_specs.append(pl.BlockSpec((None, bq, bk), lambda bi, hi, qi, j, idx, kind, cnt, blk: (blk[qi, j], 0, 0)))
    operands.append(jnp.asarray(meta.partial_blocks))
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
  in_specs = [pl.BlockSpec((None, None, bq, d), qh_map), pl.BlockSpec((None, None, bk, d), k_map),
              pl.BlockSpec((None, None, bk, d), k_map), pl.BlockSpec((None, None, bq, d), qh_map),
              pl.BlockSpec((None, None, 1, bq), row_map), pl.BlockSpec((None, None, 1, bq), row_map)]
  operands = [q, k, v, do, lse[:, :, None, :], delta[:, :, None, :]]
  if cfg.segments:
    in_specs += [pl.BlockSpec((None, 1, bq), lambda bi, kh, ki, gi, j, idx, *_: (bi, 0, idx[ki, j])),
                 pl.BlockSpec((None, bk, 1), lambda bi, kh, ki, gi, j, *_: (bi, ki, 0))]
    operands += [qseg[:, None, :], kseg[:, :, None]]
  if cfg.table:
    in_specs.append(pl.BlockSpec((None, bk, bq), lambda bi, kh, ki, gi, j, idx, kind, cnt, blk: (blk[ki, j], 0, 0)))
    operands.append(jnp.asarray(np.ascontiguousarray(meta.partial_blocks.transpose(0, 2, 1))))
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
# GPU (Triton) kernels: one program per (batch, head, tile); a fori_loop over the listed tiles.


def _gpu_parse(refs, cfg: _Config, n_main: int):
  refs = list(refs)
  main, rest = refs[:n_main], refs[n_main:]
  qseg_ref = kseg_ref = tbl_ref = None
  if cfg.segments:
    qseg_ref, kseg_ref, rest = rest[0], rest[1], rest[2:]
  if cfg.table:
    tbl_ref, rest = rest[0], rest[1:]
  return main, qseg_ref, kseg_ref, tbl_ref, rest


def _gpu_allowed(cfg, kind, q_abs, k_abs, tbl, qseg, kseg):
  # One code path for both tile kinds (no branch): UNMASKED tiles short-circuit the predicate with `kind`.
  allowed = _allowed(cfg, q_abs, k_abs, tbl, qseg, kseg, True)
  if cfg.segments:
    return allowed | ((kind == UNMASKED) & masks_lib.segment_predicate(qseg, kseg))
  return allowed | (kind == UNMASKED)


def _gpu_fwd_kernel(idx_ref, kind_ref, cnt_ref, blk_ref, *refs, cfg: _Config, counter: bool):
  (q_ref, k_ref, v_ref), qseg_ref, kseg_ref, tbl_ref, rest = _gpu_parse(refs, cfg, 3)
  o_ref, lse_ref = rest[0], rest[1]
  qi = pl.program_id(2)
  bq, bk = cfg.block_q, cfg.block_kv
  q = q_ref[...]
  q_abs = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  qseg = qseg_ref[...][:, None] if cfg.segments else None

  def body(t, carry):
    m, l, acc = carry
    kt = idx_ref[qi, t]
    start = pl.multiple_of(kt * bk, bk)
    k_abs = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    tbl = tbl_ref[blk_ref[qi, t]] if cfg.table else None
    kseg = kseg_ref[pl.ds(start, bk)][None, :] if cfg.segments else None
    allowed = _gpu_allowed(cfg, kind_ref[qi, t], q_abs, k_abs, tbl, qseg, kseg)
    s, _ = _scores(q, k_ref[pl.ds(start, bk), :], cfg)
    return _online_softmax_step(s, allowed, v_ref[pl.ds(start, bk), :], m, l, acc)

  count = cnt_ref[qi]
  init = (jnp.full((bq, 1), NEG_INF, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = lax.fori_loop(0, count, body, init)
  o, lse = _finalize(l, m, acc)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]
  if counter:
    rest[2][...] = jnp.full((1,), count, jnp.int32)  # the loop ran exactly `count` tile steps


def _gpu_params():
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _gpu_meta_specs(shape_list):
  return [pl.BlockSpec(s, (lambda *args, _n=len(s): (0,) * _n)) for s in shape_list]


def _gpu_fwd(cfg: _Config, q, k, v, qseg, kseg, counter: bool):
  meta = cfg.meta
  b, h, tp, d = q.shape
  sp = k.shape[2]
  bq, bk, g = cfg.block_q, cfg.block_kv, cfg.groups
  nq = meta.num_q_tiles
  mets = [meta.fwd_kv_index, meta.fwd_kind, meta.fwd_count, meta.fwd_block_id]
  in_specs = _gpu_meta_specs([m.shape for m in mets]) + [
      pl.BlockSpec((None, None, bq, d), lambda bi, hi, qi: (bi, hi, qi, 0)),
      pl.BlockSpec((None, None, sp, d), lambda bi, hi, qi: (bi, hi // g, 0, 0)),
      pl.BlockSpec((None, None, sp, d), lambda bi, hi, qi: (bi, hi // g, 0, 0))]
  operands = [jnp.asarray(m) for m in mets] + [q, k, v]
  if cfg.segments:
    in_specs += [pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
                 pl.BlockSpec((None, sp), lambda bi, hi, qi: (bi, 0))]
    operands += [qseg, kseg]
  if cfg.table:
    in_specs += _gpu_meta_specs([meta.partial_blocks.shape])
    operands.append(jnp.asarray(meta.partial_blocks))
  out_specs = [pl.BlockSpec((None, None, bq, d), lambda bi, hi, qi: (bi, hi, qi, 0)),
               pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)]
  if counter:
    out_specs.append(pl.BlockSpec((None, None, 1), lambda bi, hi, qi: (bi, hi, qi)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, nq), jnp.int32))
  outs = pl.pallas_call(
      functools.partial(_gpu_fwd_kernel, cfg=cfg, counter=counter), grid=(b, h, nq), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, compiler_params=_gpu_params(),
      cost_estimate=_cost(cfg, b, h, d, q.dtype.itemsize, "fwd"), interpret=cfg.interpret_arg,
      name=f"block_sparse_attention_fwd_gpu_bq{bq}_bk{bk}",
  )(*operands)
  return (outs[0], outs[1], outs[2]) if counter else (outs[0], outs[1], None)


def _gpu_dq_kernel(idx_ref, kind_ref, cnt_ref, blk_ref, *refs, cfg: _Config):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kseg_ref, tbl_ref, rest = _gpu_parse(refs, cfg, 6)
  (dq_ref,) = rest
  qi = pl.program_id(2)
  bq, bk = cfg.block_q, cfg.block_kv
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_abs = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  qseg = qseg_ref[...][:, None] if cfg.segments else None

  def body(t, dq):
    start = pl.multiple_of(idx_ref[qi, t] * bk, bk)
    k_abs = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    tbl = tbl_ref[blk_ref[qi, t]] if cfg.table else None
    kseg = kseg_ref[pl.ds(start, bk)][None, :] if cfg.segments else None
    allowed = _gpu_allowed(cfg, kind_ref[qi, t], q_abs, k_abs, tbl, qseg, kseg)
    k = k_ref[pl.ds(start, bk), :]
    s, dcap = _scores(q, k, cfg)
    p = _probs(s, lse, allowed)
    dp = lax.dot_general(do, v_ref[pl.ds(start, bk), :], _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta)
    if dcap is not None:
      ds = ds * dcap
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  dq = lax.fori_loop(0, cnt_ref[qi], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _gpu_dkv_kernel(idx_ref, kind_ref, cnt_ref, blk_ref, *refs, cfg: _Config):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kseg_ref, tbl_ref, rest = _gpu_parse(refs, cfg, 6)
  dk_ref, dv_ref = rest
  ki = pl.program_id(2)
  bq, bk = cfg.block_q, cfg.block_kv
  k, v = k_ref[...], v_ref[...]
  k_abs = ki * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
  kseg = kseg_ref[...][:, None] if cfg.segments else None

  def body_for_head(gi):
    def body(t, carry):
      dk, dv = carry
      start = pl.multiple_of(idx_ref[ki, t] * bq, bq)
      q_abs = start + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
      tbl = tbl_ref[blk_ref[ki, t]] if cfg.table else None
      qseg = qseg_ref[pl.ds(start, bq)][None, :] if cfg.segments else None
      allowed = _gpu_allowed(cfg, kind_ref[ki, t], q_abs, k_abs, tbl, qseg, kseg)
      q = q_ref[gi, pl.ds(start, bq), :]
      do = do_ref[gi, pl.ds(start, bq), :]
      s, dcap = _scores(k, q, cfg)  # transposed [bk, bq]
      p = _probs(s, lse_ref[gi, pl.ds(start, bq)][None, :], allowed)
      dv = dv + jnp.dot(p.astype(do.dtype), do, preferred_element_type=jnp.float32)
      dp = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_ref[gi, pl.ds(start, bq)][None, :])
      if dcap is not None:
        ds = ds * dcap
      dk = dk + jnp.dot(ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
      return dk, dv
    return body

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  for gi in range(cfg.groups):  # static: the query heads that share this kv head
    carry = lax.fori_loop(0, cnt_ref[ki], body_for_head(gi), carry)
  dk, dv = carry
  dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_bwd(cfg: _Config, q, k, v, qseg, kseg, o, lse, do):
  meta = cfg.meta
  b, h, tp, d = q.shape
  kvh, sp = k.shape[1], k.shape[2]
  bq, bk, g = cfg.block_q, cfg.block_kv, cfg.groups
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  itemsize = q.dtype.itemsize

  mets = [meta.fwd_kv_index, meta.fwd_kind, meta.fwd_count, meta.fwd_block_id]
  qb = lambda bi, hi, qi: (bi, hi, qi, 0)
  kvb = lambda bi, hi, qi: (bi, hi // g, 0, 0)
  in_specs = _gpu_meta_specs([m.shape for m in mets]) + [
      pl.BlockSpec((None, None, bq, d), qb), pl.BlockSpec((None, None, sp, d), kvb),
      pl.BlockSpec((None, None, sp, d), kvb), pl.BlockSpec((None, None, bq, d), qb),
      pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)),
      pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi))]
  operands = [jnp.asarray(m) for m in mets] + [q, k, v, do, lse, delta]
  if cfg.segments:
    in_specs += [pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
                 pl.BlockSpec((None, sp), lambda bi, hi, qi: (bi, 0))]
    operands += [qseg, kseg]
  if cfg.table:
    in_specs += _gpu_meta_specs([meta.partial_blocks.shape])
    operands.append(jnp.asarray(meta.partial_blocks))
  dq = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, cfg=cfg), grid=(b, h, meta.num_q_tiles), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, bq, d), qb), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_gpu_params(), cost_estimate=_cost(cfg, b, h, d, itemsize, "dq"),
      interpret=cfg.interpret_arg, name=f"block_sparse_attention_dq_gpu_bq{bq}_bk{bk}",
  )(*operands)

  mets = [meta.dkv_q_index, meta.dkv_kind, meta.dkv_count, meta.dkv_block_id]
  grp = lambda bi, kh, ki: (bi, kh, 0, 0)   # the g query heads of kv head kh (block index in units of g)
  kb = lambda bi, kh, ki: (bi, kh, ki, 0)
  in_specs = _gpu_meta_specs([m.shape for m in mets]) + [
      pl.BlockSpec((None, g, tp, d), grp), pl.BlockSpec((None, None, bk, d), kb),
      pl.BlockSpec((None, None, bk, d), kb), pl.BlockSpec((None, g, tp, d), grp),
      pl.BlockSpec((None, g, tp), lambda bi, kh, ki: (bi, kh, 0)),
      pl.BlockSpec((None, g, tp), lambda bi, kh, ki: (bi, kh, 0))]
  operands = [jnp.asarray(m) for m in mets] + [q, k, v, do, lse, delta]
  if cfg.segments:
    in_specs += [pl.BlockSpec((None, tp), lambda bi, kh, ki: (bi, 0)),
                 pl.BlockSpec((None, bk), lambda bi, kh, ki: (bi, ki))]
    operands += [qseg, kseg]
  if cfg.table:
    pt = np.ascontiguousarray(meta.partial_blocks.transpose(0, 2, 1))
    in_specs += _gpu_meta_specs([pt.shape])
    operands.append(jnp.asarray(pt))
  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkv_kernel, cfg=cfg), grid=(b, kvh, meta.num_kv_tiles), in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bk, d), kb)] * 2,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_gpu_params(), cost_estimate=_cost(cfg, b, h, d, itemsize, "dkv"),
      interpret=cfg.interpret_arg, name=f"block_sparse_attention_dkv_gpu_bq{bq}_bk{bk}",
  )(*operands)
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
  """Block-sparse flash attention; same result as :func:`ardiff.attention.reference_attention`.

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
  backend = _resolve_backend(backend, interpret)
  b, t, h, d = q.shape
  s, kvh = k.shape[1], k.shape[2]
  if backend == "gpu" and not _is_pow2(d):
    raise ValueError(f"GPU (Triton): head_dim={d} must be a power of two; pad the head dim or use backend='tpu'.")
  bq = _default_block(backend, t) if block_q is None else block_q
  bk = _default_block(backend, s) if block_kv is None else block_kv
  _check_block(backend, "block_q", bq, t)
  _check_block(backend, "block_kv", bk, s)
  segments = q_segment_ids is not None
  cfg = _Config(mask=mask, q_len=t, kv_len=s, block_q=int(bq), block_kv=int(bk), groups=h // kvh,
                sm_scale=float(d ** -0.5 if sm_scale is None else sm_scale),
                logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap), backend=backend,
                interpret=interpret, table=not meta_lib.predicate_runs_in_kernel(mask), segments=segments)
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
  out = attention_lib.reference_attention(q, k, v, mask=mask, q_segment_ids=q_segment_ids,
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
