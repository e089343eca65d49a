"""Autoregressive next-token NLL."""

from __future__ import annotations

import jax.numpy as jnp

from ardiff import masks
from ardiff.model import Transformer
from ardiff.objectives import base


def ar_nll(params, batch, *, model: Transformer):
  """Summed next-token NLL and the number of targets. Targets never cross a document boundary."""
  pb = base.prepare_batch(batch)
  out = model.apply({"params": params}, pb.tokens, mask=masks.Causal(), positions=pb.positions,
                    segment_ids=pb.segment_ids)
  nll = base.token_nll(out.logits[:, :-1], pb.tokens[:, 1:], model.config.mask_token_id)
  valid = pb.loss_mask[:, 1:] & ~base.document_starts(pb.segment_ids)[:, 1:]
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def ar_loss(params, batch, rng, *, model: Transformer, cfg: base.ObjectiveConfig):
  del rng, cfg  # deterministic
  nll_sum, count = ar_nll(params, batch, model=model)
  loss = nll_sum / jnp.maximum(count, 1)
  metrics = {"loss": loss, "num_targets": count, **base.per_token_metrics(nll_sum, count, "nll")}
  return loss, metrics


def ar_eval(params, batch, rng, *, model: Transformer, cfg: base.ObjectiveConfig):
  """Exact NLL sums for perplexity (the trainer divides summed values by summed counts)."""
  del rng, cfg
  nll_sum, count = ar_nll(params, batch, model=model)
  return {"nll_sum": nll_sum, "num_targets": count}
