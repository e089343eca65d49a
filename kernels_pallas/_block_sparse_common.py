"""What the TPU and GPU kernels of :mod:`kernels_pallas.block_sparse_attention` share: constants, the static
kernel configuration and the tile math (f32 scores with the optional soft cap, the online-softmax step, the
finalize that stores ``+1e30`` as the logsumexp of rows with no allowed key, probabilities, the elementwise
allowed mask of one tile, the cost estimate). What all kernels share (``NEG_INF``, the online-softmax step, the
backend and interpreter settings) lives in :mod:`kernels_pallas.common`."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ardiff import masks as masks_lib
from kernels_pallas import block_sparse_metadata as meta_lib
from kernels_pallas import common

EMPTY_ROW_LSE = 1e30  # logsumexp stored for rows with no allowed key: exp(s - lse) == 0 in the backward
DEFAULT_BLOCKS = {"tpu": 128, "gpu": 64}
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
_TN = (((0,), (0,)), ((), ()))  # contract the first dims: a.T @ b


# ------------------------------------------------------------------------------------------------------------------
# Static configuration of one call.


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
    return common.interpret_arg(self.backend, self.interpret)


# ------------------------------------------------------------------------------------------------------------------
# Tile math shared by both backends. Shapes: s is [rows, cols] f32.


def _scores(a, b, cfg: _Config):
  """``a @ b.T * scale`` in f32 with the optional soft cap; returns (capped scores, d capped / d raw or None)."""
  s = lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32) * cfg.sm_scale
  if cfg.logit_soft_cap is None:
    return s, None
  t = jnp.tanh(s / cfg.logit_soft_cap)
  return cfg.logit_soft_cap * t, 1.0 - t * t


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
      allowed = tbl if tbl.dtype == jnp.bool_ else tbl != 0
    else:
      allowed = (q_abs < cfg.q_len) & (k_abs < cfg.kv_len) & cfg.mask.predicate(q_abs, k_abs)
  if cfg.segments:
    # masks.segment_predicate (equal ids, not padding 0) with the padding test on the row operand: where the ids
    # are equal either side's test is the same, and a [1, n] row is cheaper than the broadcast tile.
    row = kseg if kseg.shape[0] == 1 else qseg
    seg = (qseg == kseg) & (row != 0)
    allowed = seg if allowed is None else allowed & seg
  return allowed


def _cost(cfg: _Config, b, h, d, itemsize, pass_: str) -> pl.CostEstimate:
  tiles = cfg.meta.num_nonempty
  elems = b * h * tiles * cfg.block_q * cfg.block_kv
  mm = {"fwd": 2, "dq": 3, "dkv": 4, "dkv_dq": 5}[pass_]
  tq, tk = cfg.meta.padded_q_len, cfg.meta.padded_kv_len
  nbytes = itemsize * b * h * d * (2 * tq + 2 * tk * (cfg.meta.fwd_width if pass_ in ("fwd", "dq") else 1))
  return pl.CostEstimate(flops=2 * mm * elems * d, transcendentals=elems, bytes_accessed=int(nbytes))
