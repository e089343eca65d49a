"""GPU (Triton) kernels of :func:`kernels_pallas.block_sparse_attention.block_sparse_attention`.

Grid ``(b, h, q_tiles)`` (forward, dQ) and ``(b, kvh, kv_tiles)`` (dK/dV); each program runs a
``lax.fori_loop`` over exactly the listed tiles, reading the tile index from the metadata and loading K/V (Q/dO)
with ``pl.ds``. Tiles and head_dim must be powers of two (Triton). The layout, masking and gradient conventions
are those of the TPU kernels (see :mod:`kernels_pallas.block_sparse_attention`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ardiff import masks as masks_lib
from kernels_pallas.block_sparse_metadata import UNMASKED
from kernels_pallas.common import NEG_INF, online_softmax_step
from kernels_pallas._block_sparse_common import _NT, _Config, _scores, _finalize, _probs, _allowed, _cost


# ------------------------------------------------------------------------------------------------------------------
# GPU (Triton) kernels: one program per (batch, head, tile); a fori_loop over the listed tiles.


def _gpu_allowed(cfg, kind, q_abs, k_abs, tbl, qseg, kseg):
  # One code path for both tile kinds (no branch): UNMASKED tiles short-circuit the predicate with `kind`.
  allowed = _allowed(cfg, q_abs, k_abs, tbl, qseg, kseg, True)
  if cfg.segments:
    return allowed | ((kind == UNMASKED) & masks_lib.segment_predicate(qseg, kseg))
  return allowed | (kind == UNMASKED)


def _gpu_fwd_kernel(idx_ref, kind_ref, cnt_ref, blk_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, tbl_ref, o_ref,
                    lse_ref, visits_ref, *, cfg: _Config):
  """Absent operands (segment ids, mask table, visit counter) arrive as None (None block spec)."""
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
    return online_softmax_step(s, allowed, v_ref[pl.ds(start, bk), :], m, l, acc)

  count = cnt_ref[qi]
  init = (jnp.full((bq, 1), NEG_INF, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = lax.fori_loop(0, count, body, init)
  o, lse = _finalize(l, m, acc)
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]
  if visits_ref is not None:
    visits_ref[...] = jnp.full((1,), count, jnp.int32)  # the loop ran exactly `count` tile steps


def _gpu_params():
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _gpu_meta_specs(shape_list):
  return [pl.BlockSpec(s, (lambda *args, _n=len(s): (0,) * _n)) for s in shape_list]


def _gpu_q_grid_extras(cfg: _Config, qseg, kseg, bq: int, sp: int):
  """(specs, operands) after the main ones on the ``(b, h, q_tiles)`` grid of the forward and dQ passes: segment
  ids (this tile's queries, all keys) and the host-built mask table; ``None`` (spec and operand) where the call has
  none."""
  specs, operands = [None, None, None], [None, None, None]
  if cfg.segments:
    specs[:2] = [pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
                 pl.BlockSpec((None, sp), lambda bi, hi, qi: (bi, 0))]
    operands[:2] = [qseg, kseg]
  if cfg.table:
    specs[2:] = _gpu_meta_specs([cfg.meta.partial_blocks.shape])
    operands[2] = jnp.asarray(cfg.meta.partial_blocks, jnp.int32)
  return specs, operands


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
  extra_specs, extra_operands = _gpu_q_grid_extras(cfg, qseg, kseg, bq, sp)
  in_specs += extra_specs
  operands += extra_operands
  out_specs = [pl.BlockSpec((None, None, bq, d), lambda bi, hi, qi: (bi, hi, qi, 0)),
               pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)),
               pl.BlockSpec((None, None, 1), lambda bi, hi, qi: (bi, hi, qi)) if counter else None]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
               jax.ShapeDtypeStruct((b, h, nq), jnp.int32) if counter else None]
  outs = pl.pallas_call(
      functools.partial(_gpu_fwd_kernel, cfg=cfg), grid=(b, h, nq), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, compiler_params=_gpu_params(),
      cost_estimate=_cost(cfg, b, h, d, q.dtype.itemsize, "fwd"), interpret=cfg.interpret_arg,
      name=f"block_sparse_attention_fwd_gpu_bq{bq}_bk{bk}",
  )(*operands)
  return outs[0], outs[1], outs[2]


def _gpu_dq_kernel(idx_ref, kind_ref, cnt_ref, blk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
                   kseg_ref, tbl_ref, dq_ref, *, cfg: _Config):
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


def _gpu_dkv_kernel(idx_ref, kind_ref, cnt_ref, blk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                    qseg_ref, kseg_ref, tbl_ref, dk_ref, dv_ref, *, cfg: _Config):
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
  extra_specs, extra_operands = _gpu_q_grid_extras(cfg, qseg, kseg, bq, sp)
  in_specs += extra_specs
  operands += extra_operands
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
  else:
    in_specs += [None, None]
    operands += [None, None]
  if cfg.table:
    pt = np.ascontiguousarray(meta.partial_blocks.transpose(0, 2, 1))
    in_specs += _gpu_meta_specs([pt.shape])
    operands.append(jnp.asarray(pt, jnp.int32))
  else:
    in_specs.append(None)
    operands.append(None)
  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkv_kernel, cfg=cfg), grid=(b, kvh, meta.num_kv_tiles), in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bk, d), kb)] * 2,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_gpu_params(), cost_estimate=_cost(cfg, b, h, d, itemsize, "dkv"),
      interpret=cfg.interpret_arg, name=f"block_sparse_attention_dkv_gpu_bq{bq}_bk{bk}",
  )(*operands)
  return dq, dk, dv
