"""Decode attention against a static-shape KV cache.

The cached forward of the model works on a per-layer cache

* ``k_cache, v_cache: [batch, max_len, kv_heads, head_dim]`` and ``lengths: int32[batch]`` (clean entries per row);
* a forward of ``T`` new tokens first writes their K/V rows at ``[lengths[b], lengths[b] + T)`` (XLA's
  ``dynamic_update_slice``, in place on a donated cache), then attends ``q: [batch, T, heads, head_dim]`` to the
  cache (:func:`decode_attention`) with query ``i`` of row ``b`` at absolute index ``q_offsets[b] + i`` and key
  ``j`` allowed iff ``mask.predicate(q_offsets[b] + i, j) & (j < kv_lengths[b])``.

The pure-JAX reference beside it, :func:`decode_attention_reference`, is exactly
:func:`kernels_pallas.reference.reference_attention`.

Kernels
-------
``backend="tpu"`` (Mosaic): grid ``(batch, kv_tiles)``; ``q_offsets``/``kv_lengths`` are scalar-prefetch operands.
The cache is viewed as ``[batch, max_len, kv_heads * head_dim]`` (a free reshape) so a K/V tile is one dense
``(block_kv, kv_heads * head_dim)`` VMEM block; all kv heads of a row are processed in one grid step, each with its
``T * groups`` query rows (GQA: the queries of one kv head form one matrix). The K/V index maps clamp the tile index
to the row's last needed tile, so grid steps past ``kv_lengths[b]`` revisit the same block and issue no DMA, and
``pl.when`` skips their compute. Online softmax in float32 scratch.

``backend="gpu"`` (Pallas Triton): grid ``(batch, kv_heads)``; each program loops ``lax.fori_loop`` over exactly
``cdiv(kv_lengths[b], block_kv)`` tiles, loading each with ``pl.ds`` (nothing past the valid prefix is read).
Triton needs power-of-two tiles: ``block_kv`` and ``head_dim`` powers of two, query rows padded to >= 16.

The mask predicate is evaluated elementwise in the kernel from iotas when it is pure integer arithmetic (Causal,
BlockCausal, Full, BD3, ... and their ``&``/``|``). A predicate that needs a table (``masks.Explicit``, e.g. a
TiDAR decode mask) cannot be evaluated inside a kernel (no gathers, no captured arrays); for those the allowed
entries of the ``T`` query rows are computed by XLA into an ``int32[batch, rows, max_len]`` operand that the kernel
reads tile by tile (same clamped index map: only the valid prefix is read).

``interpret``: ``False`` compiles for the backend; ``True`` runs the same kernel in an interpreter on any host
(TPU backend: ``pltpu.InterpretParams()``, which simulates VMEM/SMEM and DMAs; GPU backend: generic Pallas
interpret). A ``pltpu.InterpretParams`` instance may be passed for the TPU backend.

Forward only: decode is never differentiated.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from ardiff import masks as masks_lib
from kernels_pallas import common
from kernels_pallas import reference as reference_lib
from kernels_pallas.common import NEG_INF, online_softmax_step
from kernels_pallas._block_sparse_tpu import LANES, _softmax_step as softmax_step_lanes
_TPU_BLOCK_KV_CANDIDATES = (512, 256, 128)
_GPU_BLOCK_KV_CANDIDATES = (128, 64, 32, 16)
_GPU_MIN_ROWS = 16  # tl.dot needs M >= 16


# ------------------------------------------------------------------------------------------------------------------
# Helpers shared by both kernels.


def _check_inputs(q, k_cache, v_cache, q_offsets, kv_lengths):
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, T, heads, head_dim], got shape {q.shape}.")
  if k_cache.ndim != 4 or v_cache.ndim != 4:
    raise ValueError(f"k_cache and v_cache must be [batch, max_len, kv_heads, head_dim], got {k_cache.shape} and "
                     f"{v_cache.shape}.")
  if k_cache.shape != v_cache.shape:
    raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must have the same shape.")
  if k_cache.dtype != v_cache.dtype:
    raise ValueError(f"k_cache and v_cache must have the same dtype, got {k_cache.dtype} and {v_cache.dtype}.")
  b, t, h, d = q.shape
  cb, s, kvh, cd = k_cache.shape
  if cb != b:
    raise ValueError(f"q batch {b} != cache batch {cb}.")
  if cd != d:
    raise ValueError(f"q head_dim {d} != cache head_dim {cd}.")
  if h % kvh:
    raise ValueError(f"kv_heads={kvh} must divide heads={h} (grouped-query attention).")
  if t < 1:
    raise ValueError(f"q must hold at least one query token, got T={t}.")
  if t > s:
    raise ValueError(f"T={t} new tokens exceed the cache max_len={s}.")
  for name, arr in (("q_offsets", q_offsets), ("kv_lengths", kv_lengths)):
    shape = np.shape(arr)
    if shape != (b,):
      raise ValueError(f"{name} must have shape (batch,) = ({b},), got {shape}.")
    if not jnp.issubdtype(jnp.result_type(arr), jnp.integer):
      raise ValueError(f"{name} must be an integer array, got dtype {jnp.result_type(arr)}.")


def _default_block_kv(backend: str, s: int) -> int:
  cands = _TPU_BLOCK_KV_CANDIDATES if backend == "tpu" else _GPU_BLOCK_KV_CANDIDATES
  for c in cands:
    if s % c == 0:
      return c
  if backend == "tpu" and s <= 2048:
    return s  # one tile equal to the full dimension is always a legal TPU block
  raise ValueError(f"max_len={s} is not a multiple of any of {cands}; pass block_kv= dividing it (pad the cache "
                   f"to a multiple of 128 for the TPU kernel, of 16 for the GPU kernel).")


def _check_block_kv(backend: str, s: int, bk: int, table: bool, d: int):
  if not isinstance(bk, (int, np.integer)) or bk < 1:
    raise ValueError(f"block_kv must be a positive integer, got {bk!r}.")
  if s % bk:
    raise ValueError(f"block_kv={bk} must divide the cache max_len={s}.")
  if backend == "tpu":
    if bk != s and bk % 8:
      raise ValueError(f"TPU: block_kv={bk} must be a multiple of 8 (sublane tiling) or equal max_len={s}.")
    if table and bk != s and bk % 128:
      raise ValueError(f"TPU: with a table mask (e.g. masks.Explicit) block_kv={bk} must be a multiple of 128 "
                       f"(lane tiling of the mask tile) or equal max_len={s}.")
  else:
    if not common.is_pow2(bk) or bk < 16:
      raise ValueError(f"GPU (Triton): block_kv={bk} must be a power of two >= 16.")
    if not common.is_pow2(d):
      raise ValueError(f"GPU (Triton): head_dim={d} must be a power of two.")


def _mask_table(mask, q_offsets, t: int, g: int, s: int, rows: int):
  """``int32[b, rows, s]``: allowed entries of query row ``r = i * g + gi`` (rows past ``t*g`` are 0)."""
  q_abs = q_offsets[:, None, None] + jnp.arange(t, dtype=jnp.int32)[None, :, None]
  k_abs = jnp.arange(s, dtype=jnp.int32)[None, None, :]
  allowed = jnp.broadcast_to(mask.predicate(q_abs, k_abs), (q_offsets.shape[0], t, s))
  allowed = jnp.repeat(allowed.astype(jnp.int32), g, axis=1)
  if rows > t * g:
    allowed = jnp.pad(allowed, ((0, 0), (0, rows - t * g), (0, 0)))
  return allowed


def _logits(q, k, sm_scale, logit_soft_cap):
  s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * sm_scale
  if logit_soft_cap is not None:
    s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
  return s


def _query_index(q_off, rows: int, cols: int, g: int):
  r = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
  if g > 1:
    r = r // g
  return q_off + r


# ------------------------------------------------------------------------------------------------------------------
# TPU (Mosaic) kernel.


def _tpu_kernel(qoff_ref, kvlen_ref, q_ref, k_ref, v_ref, tbl_ref, o_ref, m_sc, l_sc, acc_sc, *, kvh, d, g, bk,
                sm_scale, logit_soft_cap, mask):
  """``tbl_ref`` is None (None block spec) unless the mask needs its table."""
  bi, j = pl.program_id(0), pl.program_id(1)
  nk = pl.num_programs(1)
  kv_len = kvlen_ref[bi]
  rows = q_ref.shape[1]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j * bk < kv_len)
  def _compute():
    k_abs = j * bk + jax.lax.broadcasted_iota(jnp.int32, (rows, bk), 1)
    allowed = k_abs < kv_len
    if tbl_ref is not None:
      allowed = allowed & (tbl_ref[...] != 0)
    else:
      allowed = allowed & mask.predicate(_query_index(qoff_ref[bi], rows, bk, g), k_abs)
    # The cache puts heads on sublanes ([max_len, kvh, d]). One head-major relayout of the whole tile (einshape)
    # costs far less than slicing each head out (a sublane gather per head): v5e, 512 rows x 8 heads, 2,392
    # bundles against 8,148. A block per head is not a legal TPU block (kvh is the second-minor dim), and a DMA of
    # one head's rows is refused (not tile-aligned).
    kt = pltpu.einshape("khd->hkd", k_ref[...])  # [kvh, bk, d]
    vt = pltpu.einshape("khd->hkd", v_ref[...])
    for h in range(kvh):  # static: all kv heads of this row share the tile's DMA
      k, v = kt[h], vt[h]
      s = _logits(q_ref[h], k, sm_scale, logit_soft_cap)
      m, l, acc = softmax_step_lanes(s, allowed, v, m_sc[h], l_sc[h], acc_sc[h])
      m_sc[h], l_sc[h], acc_sc[h] = m, l, acc

  @pl.when(j == nk - 1)
  def _finalize():
    l = l_sc[...][:, :, :1]
    o_ref[...] = (acc_sc[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def _decode_tpu(qg, k_cache, v_cache, q_offsets, kv_lengths, tbl, *, g, bk, sm_scale, logit_soft_cap, mask,
                interpret):
  b, kvh, rows, d = qg.shape
  s = k_cache.shape[1]
  nk = s // bk

  def kv_map(bi, j, qoff, kvlen):
    last = jnp.maximum(pl.cdiv(kvlen[bi], bk) - 1, 0)
    return bi, jnp.minimum(j, last), 0, 0

  def tbl_map(bi, j, qoff, kvlen):
    last = jnp.maximum(pl.cdiv(kvlen[bi], bk) - 1, 0)
    return bi, 0, jnp.minimum(j, last)

  in_specs = [pl.BlockSpec((None, kvh, rows, d), lambda bi, j, *_: (bi, 0, 0, 0)),
              pl.BlockSpec((None, bk, kvh, d), kv_map),
              pl.BlockSpec((None, bk, kvh, d), kv_map)]
  if not interpret:
    # Keep the cache in HBM: otherwise XLA's memory-space assignment may prefetch a (small) cache whole into VMEM
    # ahead of the call, reading every tile we mean to skip (seen in compiled HLO when a table mask is computed).
    k_cache = pltpu.with_memory_space_constraint(k_cache, pltpu.HBM)
    v_cache = pltpu.with_memory_space_constraint(v_cache, pltpu.HBM)
  in_specs.append(None if tbl is None else pl.BlockSpec((None, rows, bk), tbl_map))
  operands = [qg, k_cache, v_cache, tbl]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, nk), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, kvh, rows, d), lambda bi, j, *_: (bi, 0, 0, 0)),
      scratch_shapes=[pltpu.VMEM((kvh, rows, LANES), jnp.float32), pltpu.VMEM((kvh, rows, LANES), jnp.float32),
                      pltpu.VMEM((kvh, rows, d), jnp.float32)])
  itemsize = jnp.dtype(k_cache.dtype).itemsize
  kernel = functools.partial(_tpu_kernel, kvh=kvh, d=d, g=g, bk=bk, sm_scale=sm_scale,
                             logit_soft_cap=logit_soft_cap, mask=mask)
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(qg.shape, qg.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(flops=4 * b * kvh * rows * s * d, transcendentals=b * kvh * rows * s,
                                    bytes_accessed=2 * b * s * kvh * d * itemsize + 2 * qg.size * qg.dtype.itemsize),
      interpret=interpret, name=f"decode_attention_tpu_bk{bk}",
  )(q_offsets, kv_lengths, *operands)


# ------------------------------------------------------------------------------------------------------------------
# GPU (Triton) kernel.


def _gpu_kernel(sc_ref, q_ref, k_ref, v_ref, tbl_ref, o_ref, *, g, bk, sm_scale, logit_soft_cap, mask):
  """``tbl_ref`` is None (None block spec) unless the mask needs its table."""
  table = tbl_ref is not None
  q_off, kv_len = sc_ref[0], sc_ref[1]
  rows, d = q_ref.shape
  q = q_ref[...]
  q_abs = None if table else _query_index(q_off, rows, bk, g)

  def body(t, carry):
    m, l, acc = carry
    start = pl.multiple_of(t * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    k_abs = start + jax.lax.broadcasted_iota(jnp.int32, (rows, bk), 1)
    allowed = k_abs < kv_len
    if table:
      allowed = allowed & (tbl_ref[:, pl.ds(start, bk)] != 0)
    else:
      allowed = allowed & mask.predicate(q_abs, k_abs)
    return online_softmax_step(_logits(q, k, sm_scale, logit_soft_cap), allowed, v, m, l, acc)

  init = (jnp.full((rows, 1), NEG_INF, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, d), jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, pl.cdiv(kv_len, bk), body, init)  # only the row's valid tiles
  o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def _decode_gpu(qg, k_cache, v_cache, q_offsets, kv_lengths, tbl, *, g, bk, sm_scale, logit_soft_cap, mask,
                interpret):
  b, kvh, rows, d = qg.shape
  s = k_cache.shape[1]
  scalars = jnp.stack([q_offsets, kv_lengths], axis=1)  # [b, 2]: per-row q offset and kv length
  in_specs = [pl.BlockSpec((None, 2), lambda bi, h: (bi, 0)),
              pl.BlockSpec((None, None, rows, d), lambda bi, h: (bi, h, 0, 0)),
              pl.BlockSpec((None, s, None, d), lambda bi, h: (bi, 0, h, 0)),
              pl.BlockSpec((None, s, None, d), lambda bi, h: (bi, 0, h, 0))]
  in_specs.append(None if tbl is None else pl.BlockSpec((None, rows, s), lambda bi, h: (bi, 0, 0)))
  operands = [scalars, qg, k_cache, v_cache, tbl]
  kernel = functools.partial(_gpu_kernel, g=g, bk=bk, sm_scale=sm_scale, logit_soft_cap=logit_soft_cap,
                             mask=mask)
  itemsize = jnp.dtype(k_cache.dtype).itemsize
  return pl.pallas_call(
      kernel, grid=(b, kvh), in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, rows, d), lambda bi, h: (bi, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct(qg.shape, qg.dtype),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),  # Triton, not the Mosaic GPU default
      cost_estimate=pl.CostEstimate(flops=4 * b * kvh * rows * s * d, transcendentals=b * kvh * rows * s,
                                    bytes_accessed=2 * b * s * kvh * d * itemsize + 2 * qg.size * qg.dtype.itemsize),
      interpret=interpret, name=f"decode_attention_gpu_bk{bk}",
  )(*operands)


# ------------------------------------------------------------------------------------------------------------------
# Public API.


def decode_attention(q, k_cache, v_cache, *, q_offsets, kv_lengths, mask: masks_lib.Mask,
                     sm_scale: Optional[float] = None, logit_soft_cap: Optional[float] = None,
                     block_kv: Optional[int] = None, backend: Optional[str] = None, interpret=False):
  """Attention of ``T`` new queries per row to a static-shape KV cache, reading only each row's valid prefix.

  Args:
    q: ``[batch, T, heads, head_dim]``.
    k_cache, v_cache: ``[batch, max_len, kv_heads, head_dim]``; ``kv_heads`` divides ``heads``.
    q_offsets: ``int[batch]``: absolute index of query 0 of each row (``lengths`` before the write).
    kv_lengths: ``int[batch]``: valid cache entries per row (``lengths + T`` after the write). Keys at or past it
      are never read by the compiled kernels and never attended.
    mask: any :class:`ardiff.masks.Mask`, evaluated at ``(q_offsets[b] + i, j)``.
    sm_scale: logit scale, default ``head_dim ** -0.5``.
    logit_soft_cap: if set, logits become ``cap * tanh(logits / cap)``.
    block_kv: cache rows per tile (must divide ``max_len``); default 512/256/128 on TPU, 128..16 on GPU.
    backend: ``"tpu"``, ``"gpu"`` or ``None`` (= ``jax.default_backend()``; on CPU this raises).
    interpret: run the backend's kernel in the Pallas interpreter (``True`` or, for TPU, a
      ``pltpu.InterpretParams``).

  Returns:
    ``[batch, T, heads, head_dim]`` in ``q.dtype``; rows that see no key are zeros. Equals
    ``kernels_pallas.reference.reference_attention(q, k_cache, v_cache, mask=mask, q_offsets=q_offsets,
    kv_lengths=kv_lengths, ...)``.
  """
  _check_inputs(q, k_cache, v_cache, q_offsets, kv_lengths)
  if not isinstance(mask, masks_lib.Mask):
    raise ValueError(f"mask must be an ardiff.masks.Mask, got {type(mask).__name__}.")
  backend = common.resolve_backend(backend, interpret, kernel="decode")
  interpret = common.interpret_arg(backend, interpret)
  b, t, h, d = q.shape
  s, kvh = k_cache.shape[1], k_cache.shape[2]
  g = h // kvh
  table = not common.predicate_runs_in_kernel(mask)
  bk = _default_block_kv(backend, s) if block_kv is None else block_kv
  _check_block_kv(backend, s, bk, table, d)
  sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)
  logit_soft_cap = None if logit_soft_cap is None else float(logit_soft_cap)
  q_offsets = jnp.asarray(q_offsets, jnp.int32)
  kv_lengths = jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, s)

  rows = t * g
  # [b, T, kvh, g, d] -> [b, kvh, T*g, d]: row r = i * g + gi holds query token i, head kvh_idx * g + gi.
  qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, rows, d)
  if backend == "gpu":
    rows = max(_GPU_MIN_ROWS, pl.next_power_of_2(rows))
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - t * g), (0, 0)))
  tbl = _mask_table(mask, q_offsets, t, g, s, rows) if table else None
  fn = _decode_tpu if backend == "tpu" else _decode_gpu
  out = fn(qg, k_cache, v_cache, q_offsets, kv_lengths, tbl, g=g, bk=bk, sm_scale=sm_scale,
           logit_soft_cap=logit_soft_cap, mask=mask, interpret=interpret)
  out = out[:, :, :t * g]
  return out.reshape(b, kvh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def decode_attention_reference(q, k_cache, v_cache, *, q_offsets, kv_lengths, mask: masks_lib.Mask,
                               sm_scale: Optional[float] = None, logit_soft_cap: Optional[float] = None):
  """Pure-JAX reference: the dense masked softmax of :func:`kernels_pallas.reference.reference_attention`."""
  _check_inputs(q, k_cache, v_cache, q_offsets, kv_lengths)
  return reference_lib.reference_attention(q, k_cache, v_cache, mask=mask, q_offsets=q_offsets,
                                          kv_lengths=kv_lengths, sm_scale=sm_scale, logit_soft_cap=logit_soft_cap)
