"""TiDAR training objective over ``[clean ; all-[MASK] draft]`` with the TiDAR mask (docs/algorithms.md §3.3, §5.2).

Clean rows are a causal AR model (next-token loss); draft block j sees the clean tokens before it and predicts
its own positions in one diffusion step from a fully masked block. Loss = (alpha * AR + diffusion) / (1 + alpha),
each term averaged over its targets. Both halves share positions.
"""

from __future__ import annotations

import jax.numpy as jnp

from ardiff import masks
from ardiff.model import Transformer
from ardiff.objectives import base
from ardiff.objectives.diffusion import maskable_tokens


def tidar_terms(params, batch, *, model: Transformer, cfg: base.ObjectiveConfig):
  mask_id = model.config.mask_token_id
  if mask_id is None:
    raise ValueError("TiDAR needs model.mask_token_id (the draft slots are [MASK] tokens).")
  pb = base.prepare_batch(batch)
  cfg.check_seq_len(pb.tokens.shape[1])
  length = pb.tokens.shape[1]
  draft = jnp.full_like(pb.tokens, mask_id)
  out = model.apply({"params": params}, jnp.concatenate([pb.tokens, draft], axis=1),
                    mask=masks.TiDARTrain(length, cfg.block_size),
                    positions=jnp.concatenate([pb.positions, pb.positions], axis=1),
                    segment_ids=jnp.concatenate([pb.segment_ids, pb.segment_ids], axis=1))
  ar_nll = base.token_nll(out.logits[:, :length - 1], pb.tokens[:, 1:], mask_id)
  ar_valid = pb.loss_mask[:, 1:] & ~base.document_starts(pb.segment_ids)[:, 1:]
  diff_nll = base.token_nll(out.logits[:, length:], pb.tokens, mask_id)
  diff_valid = maskable_tokens(pb, cfg)
  return (jnp.sum(jnp.where(ar_valid, ar_nll, 0.0)), jnp.sum(ar_valid),
          jnp.sum(jnp.where(diff_valid, diff_nll, 0.0)), jnp.sum(diff_valid))


def tidar_loss(params, batch, rng, *, model: Transformer, cfg: base.ObjectiveConfig):
  del rng  # the draft half is fully masked: no noise to draw
  ar_sum, ar_n, diff_sum, diff_n = tidar_terms(params, batch, model=model, cfg=cfg)
  ar = ar_sum / jnp.maximum(ar_n, 1)
  diff = diff_sum / jnp.maximum(diff_n, 1)
  loss = (cfg.tidar_alpha * ar + diff) / (1.0 + cfg.tidar_alpha)
  metrics = {"loss": loss, "ar_nll": ar, "draft_ce": diff, "num_targets": ar_n,
             **base.per_token_metrics(ar_sum, ar_n, "nll")}
  return loss, metrics


def tidar_eval(params, batch, rng, *, model: Transformer, cfg: base.ObjectiveConfig):
  """TiDAR's samples follow its AR mode, so its perplexity is the exact AR NLL of the clean half."""
  del rng
  ar_sum, ar_n, diff_sum, diff_n = tidar_terms(params, batch, model=model, cfg=cfg)
  return {"nll_sum": ar_sum, "num_targets": ar_n, "draft_ce_sum": diff_sum, "num_draft_targets": diff_n}
