"""Masked diffusion and block diffusion (BD3-LM), trained exactly over the 2L sequence ``[x_t ; x_0]``.

One forward serves every block: the BD3 mask lets noisy block b see itself and the clean blocks < b, while the
clean half is block-causal (the same keys a KV cache holds at inference). Both halves share positions; the
logits come from the ``x_t`` half. ``block_size == seq_len`` is MDLM, computed with one bidirectional stream
(there are no clean blocks to see); ``block_size == 1`` is AR.

Noise is drawn separately from the loss (:func:`sample_noise_t`, :func:`sample_noise_count`) so tests can pin it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ardiff import masks
from ardiff.model import Transformer
from ardiff.objectives import base
from ardiff.objectives import schedules


class Noise(NamedTuple):
  masked: jax.Array  # bool [b, l]: replaced by [MASK] in x_t
  weight: jax.Array  # float32 [b, l]: weight on the CE of each masked token


def maskable_tokens(pb: base.Batch, cfg: base.ObjectiveConfig) -> jax.Array:
  """Targets that may be noised: loss-mask tokens, minus document starts (BOS never masked; with token shift a
  document's first token has no predecessor to predict it)."""
  maskable = pb.loss_mask
  if cfg.ignore_bos or cfg.token_shift:
    maskable = maskable & ~base.document_starts(pb.segment_ids)
  return maskable


def sample_noise_t(rng, maskable, cfg: base.ObjectiveConfig, *, low=None, high=None):
  """One t per block in ``[low, high]`` (default: the training clip), each maskable token masked w.p. p(t).

  Returns the noise and the per-token masking probability ``p``.
  """
  bsz, length = maskable.shape
  bs = cfg.block_size
  low = cfg.clip_low if low is None else low
  high = cfg.clip_high if high is None else high
  rng_t, rng_m = jax.random.split(rng)
  t = schedules.sample_block_t(rng_t, bsz, length // bs, low=low, high=high, antithetic=cfg.antithetic)
  p = schedules.move_chance(jnp.repeat(t, bs, axis=1), cfg.weighting, cfg.noise_eps)
  masked = maskable & (jax.random.uniform(rng_m, (bsz, length)) < p)
  weight = schedules.loss_weight(jnp.maximum(p, 1e-6), cfg.weighting)
  return Noise(masked, weight), p


def sample_noise_count(rng, maskable, block_size: int) -> Noise:
  """The exact-NELBO draw (see :mod:`schedules`): per block k ~ U{1..m} of its m maskable tokens, uniformly
  placed, each weighted m/k."""
  bsz, length = maskable.shape
  nb = length // block_size
  mk = maskable.reshape(bsz, nb, block_size)
  m = jnp.sum(mk, axis=-1)
  rng_k, rng_s = jax.random.split(rng)
  k = jnp.minimum(jnp.floor(jax.random.uniform(rng_k, (bsz, nb)) * m).astype(jnp.int32) + 1, jnp.maximum(m, 1))
  scores = jnp.where(mk, jax.random.uniform(rng_s, mk.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  masked = mk & (rank < k[..., None])
  weight = jnp.broadcast_to((m / k)[..., None], mk.shape).astype(jnp.float32)
  return Noise(masked.reshape(bsz, length), weight.reshape(bsz, length))


def diffusion_logits(params, pb: base.Batch, masked, *, model: Transformer, cfg: base.ObjectiveConfig,
                     force_two_stream: bool = False) -> jax.Array:
  """``float32[b, l, vocab]``: the logits that predict each position's clean token from ``x_t``."""
  mask_id = model.config.mask_token_id
  if mask_id is None:
    raise ValueError("Diffusion objectives need model.mask_token_id (the [MASK] token id).")
  length = pb.tokens.shape[1]
  x_t = jnp.where(masked, mask_id, pb.tokens)
  if length == cfg.block_size and not cfg.token_shift and not force_two_stream:
    return model.apply({"params": params}, x_t, mask=masks.Full(), positions=pb.positions,
                       segment_ids=pb.segment_ids).logits  # MDLM: nothing clean to attend to
  out = model.apply({"params": params}, jnp.concatenate([x_t, pb.tokens], axis=1),
                    mask=masks.BD3(length, cfg.block_size),
                    positions=jnp.concatenate([pb.positions, pb.positions], axis=1),
                    segment_ids=jnp.concatenate([pb.segment_ids, pb.segment_ids], axis=1),
                    logits_len=None if cfg.token_shift else length)  # the clean half's logits are unused
  logits_t = out.logits[:, :length]
  if not cfg.token_shift:
    return logits_t
  # Token shift: row i-1 predicts token i. The first token of a block is predicted from the clean row before it,
  # exactly what the sampler has at that point (the last logit of the cached clean forward).
  shift = lambda x: jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))
  block_start = (jnp.arange(length) % cfg.block_size == 0)[None, :, None]
  return jnp.where(block_start, shift(out.logits[:, length:]), shift(logits_t))


def nll_terms(params, pb: base.Batch, noise: Noise, *, model: Transformer, cfg: base.ObjectiveConfig,
              force_two_stream: bool = False):
  """(weighted NLL sum, plain CE sum over masked tokens, number of masked tokens, per-token weighted NLL)."""
  logits = diffusion_logits(params, pb, noise.masked, model=model, cfg=cfg, force_two_stream=force_two_stream)
  nll = base.token_nll(logits, pb.tokens, model.config.mask_token_id)
  weighted = jnp.where(noise.masked, noise.weight * nll, 0.0)
  ce = jnp.where(noise.masked, nll, 0.0)
  return jnp.sum(weighted), jnp.sum(ce), jnp.sum(noise.masked), weighted


def block_diffusion_loss(params, batch, rng, *, model: Transformer, cfg: base.ObjectiveConfig, clip=None):
  """``clip``: optional ``float32[2]`` ``[low, high]`` replacing ``[cfg.clip_low, cfg.clip_high]``. A traced
  array, so the trainer can move the interval (``objective.clip_search``) without recompiling the step."""
  pb = base.prepare_batch(batch)
  cfg.check_seq_len(pb.tokens.shape[1])
  maskable = maskable_tokens(pb, cfg)
  low, high = (None, None) if clip is None else (clip[0], clip[1])
  noise, p = sample_noise_t(rng, maskable, cfg, low=low, high=high)
  n_maskable = jnp.sum(maskable)
  if cfg.complementary_masks:
    # Fast-dLLM v2: a second view masks exactly the complement, so every maskable token is supervised once.
    comp = Noise(maskable & ~noise.masked, schedules.loss_weight(jnp.maximum(1.0 - p, 1e-6), cfg.weighting))
    pb = base.Batch(*(jnp.concatenate([x, x], axis=0) for x in pb))
    noise = Noise(*(jnp.concatenate([x, y], axis=0) for x, y in zip(noise, comp)))
    n_maskable = 2 * n_maskable
  w_sum, ce_sum, n_masked, _ = nll_terms(params, pb, noise, model=model, cfg=cfg)
  if cfg.weighting == "none":
    loss = ce_sum / jnp.maximum(n_masked, 1)
  else:
    loss = w_sum / jnp.maximum(n_maskable, 1)
  metrics = {"loss": loss, "masked_ce": ce_sum / jnp.maximum(n_masked, 1),
             "mask_rate": n_masked / jnp.maximum(n_maskable, 1), "num_targets": n_maskable}
  return loss, metrics


def block_diffusion_eval(params, batch, rng, *, model: Transformer, cfg: base.ObjectiveConfig):
  """Sums for the exact NELBO (count estimator over the full [0, 1] range; never the training clip)."""
  pb = base.prepare_batch(batch)
  cfg.check_seq_len(pb.tokens.shape[1])
  maskable = maskable_tokens(pb, cfg)
  noise = sample_noise_count(rng, maskable, cfg.block_size)
  w_sum, _, _, _ = nll_terms(params, pb, noise, model=model, cfg=cfg)
  return {"nelbo_sum": w_sum, "num_targets": jnp.sum(maskable)}


def per_block_nelbo(params, batch, rng, *, model: Transformer, cfg: base.ObjectiveConfig, low, high):
  """The statistic BD3-LM's clipped-schedule search minimises the variance of (docs/algorithms.md §2.3).

  With ``t ~ U[low, high]`` per block (antithetic, as in training; ``low``/``high`` may be traced scalars) and
  1/t weights whatever ``cfg.weighting`` is, returns ``(nelbo float32[b, num_blocks], has_targets bool[b,
  num_blocks])``: each block's weighted masked CE averaged over its ``B`` positions (bd3lms'
  ``nll.reshape(b, -1, B).mean(-1)``), and whether the block has any maskable token (all-padding blocks carry
  no information about the schedule and are left out of the variance).
  """
  pb = base.prepare_batch(batch)
  cfg.check_seq_len(pb.tokens.shape[1])
  nelbo_cfg = dataclasses.replace(cfg, weighting="nelbo")
  maskable = maskable_tokens(pb, cfg)
  noise, _ = sample_noise_t(rng, maskable, nelbo_cfg, low=low, high=high)
  _, _, _, weighted = nll_terms(params, pb, noise, model=model, cfg=nelbo_cfg)
  bsz, length = weighted.shape
  blocks = (bsz, length // cfg.block_size, cfg.block_size)
  return jnp.mean(weighted.reshape(blocks), axis=-1), jnp.any(maskable.reshape(blocks), axis=-1)
