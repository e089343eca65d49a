"""Objective configuration and the pieces every objective shares: batch defaults, targets, SUBS log-probs.

A batch is a dict of ``[batch, length]`` int arrays:

* ``tokens``;
* ``segment_ids`` (optional): 1-based document ids of packed sequences, 0 = padding (default: all ones);
* ``positions`` (optional): position inside the document (default: ``arange(length)``);
* ``loss_mask`` (optional): 1 where the token is a target. For diffusion it also decides which tokens may be
  noised: prompt tokens of SFT data carry 0 and are never masked (default: 1 on non-padding tokens).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from ardiff.config import dataclass_from_dict

KINDS = ("ar", "block_diffusion", "tidar")
WEIGHTINGS = ("nelbo", "p_mask", "none")
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """What is trained. ``block_diffusion`` with ``block_size == seq_len`` is MDLM; ``block_size == 1`` is AR-like."""

  kind: str = "block_diffusion"
  block_size: int = 4
  weighting: str = "nelbo"  # "nelbo" (1/t), "p_mask" (1/p, LLaDA/SDAR), "none" (Fast-dLLM v2)
  noise_eps: float = 1e-3
  clip_low: float = 1e-3  # training draws t in [clip_low, clip_high] (BD3's clipped schedule)
  clip_high: float = 1.0
  antithetic: bool = True
  token_shift: bool = False  # Dream / Fast-dLLM v2: position i-1 predicts masked token i
  complementary_masks: bool = False  # Fast-dLLM v2: two views, masks M and not-M
  ignore_bos: bool = True  # the first token of each document is never masked
  tidar_alpha: float = 1.0  # TiDAR: loss = (alpha * AR + diffusion) / (1 + alpha)
  # BD3-LM's data-driven clipped schedule (docs/algorithms.md §2.3): every clip_search_every optimizer steps
  # (0: train.eval_every) training switches to the [lo, lo + w] (w in clip_search_widths, lo on a clip_search_delta
  # grid) whose per-block NELBO has the smallest variance over clip_search_batches validation batches.
  clip_search: bool = False
  clip_search_widths: tuple = (0.5, 0.6, 0.7, 0.8, 0.9)
  clip_search_delta: float = 0.05
  clip_search_every: int = 0
  clip_search_batches: int = 8

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"objective.kind={self.kind!r} must be one of {KINDS}.")
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"objective.weighting={self.weighting!r} must be one of {WEIGHTINGS}.")
    if not isinstance(self.block_size, int) or self.block_size < 1:
      raise ValueError(f"objective.block_size must be a positive integer, got {self.block_size!r}.")
    if not 0.0 < self.noise_eps < 1.0:
      raise ValueError(f"objective.noise_eps={self.noise_eps} must lie in (0, 1).")
    if not 0.0 < self.clip_low <= self.clip_high <= 1.0:
      raise ValueError(f"objective clip interval [{self.clip_low}, {self.clip_high}] must satisfy "
                       "0 < clip_low <= clip_high <= 1 (t = 0 would give an infinite 1/t weight).")
    if self.tidar_alpha < 0:
      raise ValueError(f"objective.tidar_alpha={self.tidar_alpha} must be >= 0.")
    self._check_clip_search()

  def _check_clip_search(self) -> None:
    widths = self.clip_search_widths
    if isinstance(widths, (int, float)):  # a single width from the command line
      widths = (widths,)
    try:
      widths = tuple(float(w) for w in widths)
    except (TypeError, ValueError):
      raise ValueError(f"objective.clip_search_widths={self.clip_search_widths!r} must be a tuple of numbers in "
                       "(0, 1], e.g. (0.5, 0.7, 0.9).") from None
    object.__setattr__(self, "clip_search_widths", widths)  # lists (config.json, CLI) become a hashable tuple
    if not isinstance(self.clip_search, bool):
      raise ValueError(f"objective.clip_search={self.clip_search!r} must be True or False.")
    if not self.clip_search:
      return
    if self.kind != "block_diffusion":
      raise ValueError(f"objective.clip_search=True needs objective.kind='block_diffusion' (got {self.kind!r}): "
                       "only block diffusion draws t from a clipped interval. Set objective.clip_search=False.")
    if self.weighting != "nelbo":
      raise ValueError(f"objective.clip_search=True minimises the variance of the NELBO (1/t) estimator, so it "
                       f"needs objective.weighting='nelbo' (got {self.weighting!r}).")
    if not widths or any(not 0.0 < w <= 1.0 for w in widths):
      raise ValueError(f"objective.clip_search_widths={widths} must be a non-empty tuple of widths in (0, 1].")
    if not 0.0 < self.clip_search_delta <= 1.0:
      raise ValueError(f"objective.clip_search_delta={self.clip_search_delta} must lie in (0, 1].")
    for name, low in (("clip_search_every", 0), ("clip_search_batches", 1)):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"objective.{name}={value!r} must be an integer >= {low}.")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ObjectiveConfig":
    return dataclass_from_dict(cls, d, "the objective config")

  def check_seq_len(self, seq_len: int) -> None:
    if self.kind in ("block_diffusion", "tidar") and seq_len % self.block_size:
      raise ValueError(f"objective.block_size={self.block_size} must divide the sequence length {seq_len}; "
                       f"use a block size dividing {seq_len} or a seq_len that is a multiple of "
                       f"{self.block_size}.")


class Batch(NamedTuple):
  """A prepared batch (:func:`prepare_batch`; the objectives call it ``pb``), every field ``[b, l]``."""

  tokens: jax.Array
  segment_ids: jax.Array
  positions: jax.Array
  loss_mask: jax.Array  # bool


def prepare_batch(batch: Mapping[str, jax.Array]) -> Batch:
  tokens = jnp.asarray(batch["tokens"], jnp.int32)
  if tokens.ndim != 2:
    raise ValueError(f"batch['tokens'] must be [batch, length], got shape {tokens.shape}.")
  shape = tokens.shape
  seg = batch.get("segment_ids")
  seg = jnp.ones(shape, jnp.int32) if seg is None else jnp.asarray(seg, jnp.int32)
  pos = batch.get("positions")
  pos = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape) if pos is None else jnp.asarray(pos, jnp.int32)
  lm = batch.get("loss_mask")
  lm = (seg != 0) if lm is None else (jnp.asarray(lm) != 0) & (seg != 0)
  for name, arr in (("segment_ids", seg), ("positions", pos), ("loss_mask", lm)):
    if arr.shape != shape:
      raise ValueError(f"batch[{name!r}] has shape {arr.shape}; it must match tokens {tokens.shape}.")
  return Batch(tokens, seg, pos, lm)


def document_starts(segment_ids: jax.Array) -> jax.Array:
  """bool ``[b, l]``: first token of each document (and position 0)."""
  prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  return segment_ids != prev


def log_probs(logits: jax.Array, mask_token_id: Optional[int]) -> jax.Array:
  """float32 log-softmax with the [MASK] logit removed (SUBS: the model never predicts [MASK]).

  Applied by every objective (AR included), so the AR and block-size-1 diffusion losses are the same function.
  """
  logits = logits.astype(jnp.float32)
  if mask_token_id is not None:
    logits = logits.at[..., mask_token_id].set(-jnp.inf)
  return jax.nn.log_softmax(logits, axis=-1)


def gather_nll(log_probs_blv: jax.Array, targets_bl: jax.Array) -> jax.Array:
  return -jnp.take_along_axis(log_probs_blv, targets_bl[..., None], axis=-1)[..., 0]


def token_nll(logits_blv: jax.Array, targets_bl: jax.Array, mask_token_id: Optional[int]) -> jax.Array:
  """``-log p(target)`` under :func:`log_probs` ``[batch, length]``, as logsumexp minus the target's logit.

  The losses' form of ``gather_nll(log_probs(logits), targets)``: it never materialises the log-probabilities,
  and the vocabulary compares (a select, not a scatter or gather) keep its gradient one elementwise fusion,
  ``softmax - one_hot`` (1.5x faster forward + backward than the gather form on a CPU). A target equal to
  ``mask_token_id`` gives ``inf``; one outside ``[0, vocab)`` gives NaN.
  """
  logits = logits_blv.astype(jnp.float32)
  vocab_ids = lax.broadcasted_iota(jnp.int32, (logits.shape[-1],), 0)
  if mask_token_id is not None:
    logits = jnp.where(vocab_ids == mask_token_id, -jnp.inf, logits)
  target_logit = jnp.sum(jnp.where(vocab_ids == targets_bl[..., None], logits, 0.0), axis=-1)
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  # A target outside the vocabulary (a -1 "ignore" id left at a loss position) matches no column: without this its
  # NLL would be the bare logsumexp, a plausible finite loss. NaN, as the gather form's out-of-bounds fill gave.
  in_vocab = (targets_bl >= 0) & (targets_bl < logits.shape[-1])
  return jnp.where(in_vocab, nll, jnp.nan)


def per_token_metrics(nll_sum: jax.Array, count: jax.Array, prefix: str) -> dict:
  """``{prefix}_per_token``, ``{prefix}_bits_per_token`` from a summed NLL/NELBO and a token count."""
  per_token = nll_sum / jnp.maximum(count, 1)
  return {f"{prefix}_per_token": per_token, f"{prefix}_bits_per_token": per_token / LN2}
