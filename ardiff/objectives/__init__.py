"""Training objectives as pure functions ``(params, batch, rng) -> (loss, metrics)``.

``make_loss_fn`` / ``make_eval_fn`` bind a model and an :class:`ObjectiveConfig`. Eval functions return *sums*
(``nll_sum`` or ``nelbo_sum`` and ``num_targets``) so that averages over many batches and hosts are exact.
"""

from __future__ import annotations

import functools

from ardiff.model import Transformer
from ardiff.objectives import ar, diffusion, schedules, tidar  # noqa: F401
from ardiff.objectives.base import LN2, ObjectiveConfig, prepare_batch  # noqa: F401

_LOSSES = {"ar": ar.ar_loss, "block_diffusion": diffusion.block_diffusion_loss, "tidar": tidar.tidar_loss}
_EVALS = {"ar": ar.ar_eval, "block_diffusion": diffusion.block_diffusion_eval, "tidar": tidar.tidar_eval}


def make_loss_fn(model: Transformer, cfg: ObjectiveConfig):
  if cfg.kind != "ar" and model.config.mask_token_id is None:
    raise ValueError(f"objective.kind={cfg.kind!r} needs model.mask_token_id; set it to the tokenizer's [MASK] id.")
  return functools.partial(_LOSSES[cfg.kind], model=model, cfg=cfg)


def make_eval_fn(model: Transformer, cfg: ObjectiveConfig):
  return functools.partial(_EVALS[cfg.kind], model=model, cfg=cfg)
