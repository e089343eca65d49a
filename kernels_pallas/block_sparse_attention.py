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

Gradients: ``jax.custom_vjp`` saving ``(q, k, v, o, logsumexp)``; ``delta = sum(o * do)`` in XLA; a dK/dV kernel
(GQA: it reduces over the query heads of its kv head) and a dQ kernel. On TPU the dK/dV kernel also computes dQ
(``ds.T @ k`` into a whole-sequence VMEM accumulator) when that fits (up to a quarter of the core's VMEM,
:func:`kernels_pallas._block_sparse_tpu._fused_dq_plan`): five matmuls per tile instead of 4 + 3, since a separate
dQ pass recomputes the scores and dP.

``interpret=True`` runs the chosen backend's kernel in an interpreter on any host: TPU → ``pltpu.InterpretParams()``
(or pass an instance), GPU → generic Pallas interpret. ``debug_counter=True`` returns ``(out, visits)`` where
``visits[b, h, q_tile]`` counts the kv tiles the forward kernel actually computed.

This module holds the API, validation, the ``custom_vjp`` and the reference;
:mod:`kernels_pallas._block_sparse_tpu` the TPU kernels, :mod:`kernels_pallas._block_sparse_gpu` the GPU
kernels and :mod:`kernels_pallas._block_sparse_common` the configuration and tile math they share.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np

from ardiff import masks as masks_lib
from kernels_pallas import common
from kernels_pallas import reference as reference_lib
from kernels_pallas import tile_table
from kernels_pallas._block_sparse_common import DEFAULT_BLOCKS, _Config
from kernels_pallas._block_sparse_gpu import _gpu_bwd, _gpu_fwd
from kernels_pallas._block_sparse_tpu import _tpu_bwd, _tpu_fwd


# ------------------------------------------------------------------------------------------------------------------
# Validation.

# q, k, v layouts: token-major [batch, len, heads, head_dim] (the model's) or head-major [batch, heads, len,
# head_dim], the kernels' own, which a caller that already holds it passes without a transpose.
LAYOUTS = ("bthd", "bhtd")
LAYOUT_NAMES = {"bthd": "[batch, len, heads, head_dim]", "bhtd": "[batch, heads, len, head_dim]"}


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


def _use_table(backend: str, mask: masks_lib.Mask) -> bool:
  """Whether partially masked tiles read a host-built, deduplicated int8 tile table instead of evaluating the
  predicate in the kernel. Always on TPU: evaluating a structured mask (BD3's divisions by the block size) over a
  [bq, bk] tile cost 2-3x an unmasked tile in the compiler's bundle count, a table tile costs ~1.1x
  (benchmarks/tpu_kernel_cost.py). GPU: only masks whose predicate cannot run in a kernel."""
  return backend == "tpu" or not common.predicate_runs_in_kernel(mask)


def _default_block(backend: str, length: int) -> int:
  if backend == "tpu":
    return tile_table.tpu_default_block(length)
  base = DEFAULT_BLOCKS[backend]
  if backend == "gpu" and length < base:
    return max(16, 1 << (length - 1).bit_length())
  return base


def _blocks(backend: str, mask, q_len: int, kv_len: int, head_dim: int, generation, block_q, block_kv) -> tuple:
  """(block_q, block_kv): the caller's, each None filled with the default (TPU: the measured per-generation table,
  which ranks every measured tile against the mask, so it runs only when a size is missing)."""
  if block_q is not None and block_kv is not None:
    return block_q, block_kv
  if backend == "tpu":
    default_q, default_kv = tile_table.tpu_tiles(mask, q_len, kv_len, head_dim, generation=generation)
  else:
    default_q, default_kv = _default_block(backend, q_len), _default_block(backend, kv_len)
  return (default_q if block_q is None else block_q), (default_kv if block_kv is None else block_kv)


def _bthd(shape, layout: str) -> tuple:
  """``[batch, len, heads, head_dim]`` dims of an array given in ``layout``."""
  return tuple(shape) if layout == "bthd" else (shape[0], shape[2], shape[1], shape[3])


def _validate(q, k, v, q_segment_ids, kv_segment_ids, mask, sm_scale, logit_soft_cap, layout="bthd"):
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS} (q, k, v as [batch, len, heads, head_dim] or "
                     f"[batch, heads, len, head_dim]), got {layout!r}.")
  names = LAYOUT_NAMES[layout]
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be {names} (layout={layout!r}), got shape {getattr(x, 'shape', None)}.")
  qs, ks, vs = (_bthd(x.shape, layout) for x in (q, k, v))
  b, t, h, d = qs
  if ks != vs:
    raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape "
                     f"{names.replace('len', 'kv_len').replace('heads', 'kv_heads')}.")
  if ks[0] != b:
    raise ValueError(f"q batch {b} != k/v batch {ks[0]}; pass the same batch size.")
  if ks[3] != d:
    raise ValueError(f"q head_dim {d} != k/v head_dim {ks[3]}; pass equal head dims.")
  if ks[2] == 0 or h % ks[2]:
    raise ValueError(f"kv_heads={ks[2]} must divide heads={h} (grouped-query attention); use a kv head count "
                     f"that divides {h}.")
  if t == 0 or ks[1] == 0:
    raise ValueError(f"q_len={t} and kv_len={ks[1]} must be positive.")
  if not (jnp.issubdtype(q.dtype, jnp.floating) and q.dtype == k.dtype == v.dtype):
    raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("Pass both q_segment_ids and kv_segment_ids, or neither.")
  if q_segment_ids is not None:
    if tuple(q_segment_ids.shape) != (b, t):
      raise ValueError(f"q_segment_ids must be [batch, q_len] = {(b, t)}, got {tuple(q_segment_ids.shape)}.")
    if tuple(kv_segment_ids.shape) != (b, ks[1]):
      raise ValueError(f"kv_segment_ids must be [batch, kv_len] = {(b, ks[1])}, got "
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
# custom_vjp over the padded, head-major layout.


def _fwd_impl(cfg, q, k, v, qseg, kseg, counter=False):
  return (_tpu_fwd if cfg.backend == "tpu" else _gpu_fwd)(cfg, q, k, v, qseg, kseg, counter)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bsa(cfg, q, k, v, qseg, kseg):
  return _fwd_impl(cfg, q, k, v, qseg, kseg)[0]


# Checkpoint names of the kernels' residuals: the forward's output and logsumexp, and the head-major (padded) q, k,
# v the kernels read. A remat policy that saves them (``jax.checkpoint_policies.save_only_these_names(
# *RESIDUAL_NAMES)``, as the model's dots policies do) keeps the backward from running the forward kernel a second
# time per layer, and from recomputing what produced q, k, v (the model's rotary embedding and the transpose to
# head-major: 13 M of 257 M XLA cycles per step of configs/bd3_1b_tpu.py on v5p, 0.4 GB of activations per chip).
RESIDUAL_NAMES = ("block_sparse_attention_out", "block_sparse_attention_lse", "block_sparse_attention_q",
                  "block_sparse_attention_k", "block_sparse_attention_v")


def _bsa_fwd(cfg, q, k, v, qseg, kseg):
  o, lse, _ = _fwd_impl(cfg, q, k, v, qseg, kseg)
  o = jax.ad_checkpoint.checkpoint_name(o, RESIDUAL_NAMES[0])
  lse = jax.ad_checkpoint.checkpoint_name(lse, RESIDUAL_NAMES[1])
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
                           backend: Optional[str] = None, interpret=False, debug_counter: bool = False,
                           layout: str = "bthd", generation: Optional[str] = None):
  """Block-sparse flash attention; same result as :func:`kernels_pallas.reference.reference_attention`.

  Args:
    q: ``[b, T, h, d]``; k, v: ``[b, S, kvh, d]`` with ``kvh | h``. One floating dtype. With ``layout="bhtd"``:
      q ``[b, h, T, d]``, k, v ``[b, kvh, S, d]`` (head-major, the kernels' own layout: no transpose in or out).
    mask: a static :class:`ardiff.masks.Mask` over absolute positions ``0..T-1`` × ``0..S-1``.
    q_segment_ids, kv_segment_ids: optional int ``[b, T]`` / ``[b, S]``; 0 is padding (packing).
    sm_scale: logit scale (default ``d ** -0.5``). logit_soft_cap: optional ``cap * tanh(logits / cap)``.
    block_q, block_kv: tile sizes. Default on TPU: :func:`kernels_pallas.tile_table.tpu_tiles` for ``generation``
      (the measured per-generation table; the length-only rule when the generation is unknown); GPU 64; short
      sequences use one tile. Lengths need not divide.
    backend: ``"tpu"`` (Mosaic), ``"gpu"`` (Triton) or None (``jax.default_backend()``).
    interpret: run the backend's kernel in the Pallas interpreter (TPU: ``pltpu.InterpretParams``).
    debug_counter: return ``(out, visits)`` with ``visits: int32[b, h, q_tiles]`` = kv tiles computed by the
      forward kernel (not differentiable).
    layout: ``"bthd"`` (default) or ``"bhtd"``, see q above; the output has the layout of q.
    generation: the TPU generation the tiles are chosen for (``"v5e"``, ``"v6e"``, ``"v5p"``, ``"v4"``); None →
      :func:`kernels_pallas.tile_table.detect_generation` (the mesh's or default device's kind).

  Returns:
    ``[b, T, h, d]`` (``[b, h, T, d]`` with ``layout="bhtd"``) in q's dtype (or ``(out, visits)`` with
    ``debug_counter``). Differentiable w.r.t. q, k, v.
  """
  _validate(q, k, v, q_segment_ids, kv_segment_ids, mask, sm_scale, logit_soft_cap, layout)
  backend = common.resolve_backend(backend, interpret, kernel="block-sparse attention")
  b, t, h, d = _bthd(q.shape, layout)
  s, kvh = _bthd(k.shape, layout)[1:3]
  if backend == "gpu" and not common.is_pow2(d):
    raise ValueError(f"GPU (Triton): head_dim={d} must be a power of two; pad the head dim or use backend='tpu'.")
  bq, bk = _blocks(backend, mask, t, s, d, generation, block_q, block_kv)
  _check_block(backend, "block_q", bq, t)
  _check_block(backend, "block_kv", bk, s)
  segments = q_segment_ids is not None
  cfg = _Config(mask=mask, q_len=t, kv_len=s, block_q=int(bq), block_kv=int(bk), groups=h // kvh,
                sm_scale=float(d ** -0.5 if sm_scale is None else sm_scale),
                logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap), backend=backend,
                interpret=interpret, table=_use_table(backend, mask), segments=segments)
  meta = cfg.meta
  tp, sp = meta.padded_q_len, meta.padded_kv_len
  head_major = (lambda x: x) if layout == "bhtd" else (lambda x: jnp.swapaxes(x, 1, 2))
  pad = lambda x, n: x if n == 0 else jnp.pad(x, ((0, 0), (0, 0), (0, n), (0, 0)))
  with jax.named_scope("block_sparse_attention"):
    qh, kh, vh = (jax.ad_checkpoint.checkpoint_name(pad(head_major(x), n - length), name)
                  for x, n, length, name in zip((q, k, v), (tp, sp, sp), (t, s, s), RESIDUAL_NAMES[2:]))
    qseg = kseg = None
    if segments:  # padded positions get segment 0 (= padding, never attends or is attended)
      qseg = jnp.pad(jnp.asarray(q_segment_ids, jnp.int32), ((0, 0), (0, tp - t)))
      kseg = jnp.pad(jnp.asarray(kv_segment_ids, jnp.int32), ((0, 0), (0, sp - s)))
    if debug_counter:
      o, _, visits = _fwd_impl(cfg, qh, kh, vh, qseg, kseg, counter=True)
    else:
      o = _bsa(cfg, qh, kh, vh, qseg, kseg)
    out = head_major(o if tp == t else o[:, :, :t])
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
  b, t, h, d = q.shape
  bq, bk = _blocks("tpu", mask, t, k.shape[1], d, None, block_q or None, block_kv or None)
  classes = mask.block_classes(t, k.shape[1], block_q=bq, block_kv=bk)
  visits = np.broadcast_to((classes != masks_lib.EMPTY).sum(axis=1).astype(np.int32), (b, h, classes.shape[0]))
  return out, jnp.asarray(visits)
