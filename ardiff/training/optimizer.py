"""AdamW + warmup/cosine (or constant) schedule + global-norm clipping + gradient accumulation."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import optax

# The config lives with the other experiment sections (light to import); re-exported for ardiff.training users.
from ardiff.sections import OptimizerConfig


def make_lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """The learning rate per optimizer update; a cosine needs ``cfg.total_steps`` (it decays over them)."""
  peak = cfg.learning_rate
  if cfg.schedule == "constant":
    if cfg.warmup_steps == 0:
      return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, cfg.warmup_steps), optax.constant_schedule(peak)], [cfg.warmup_steps])
  if cfg.total_steps is None:
    raise ValueError("optimizer.total_steps is not set; the cosine schedule decays over it: pass "
                     "make_optimizer(cfg, total_steps=N) (a validated experiment sets it to train.num_steps).")
  return optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup_steps, cfg.total_steps,
                                            end_value=peak * cfg.end_lr_ratio)


def make_optimizer(cfg: Union[OptimizerConfig, Mapping[str, Any]], total_steps: Optional[int] = None):
  """Returns ``(tx, lr_schedule)``; the schedule is indexed by optimizer update (not micro-step).

  ``cfg`` may be a dict (e.g. the ``optimizer`` section of an experiment config); ``total_steps`` (optimizer
  updates) overrides ``cfg.total_steps`` (``exp.optimizer`` of a validated experiment has it already).
  """
  if not isinstance(cfg, OptimizerConfig):
    cfg = OptimizerConfig.from_dict(cfg)
  if total_steps is not None:
    cfg = cfg.replace(total_steps=int(total_steps))
  schedule = make_lr_schedule(cfg)
  parts = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
  tx = optax.chain(*parts)
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx, schedule
