"""AdamW + warmup/cosine (or constant) schedule + global-norm clipping + gradient accumulation."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import optax

from ardiff.config import dataclass_from_dict


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-4
  schedule: str = "cosine"  # "cosine" | "constant" (both after linear warmup)
  warmup_steps: int = 0
  total_steps: int = 10_000  # optimizer updates (not micro-steps); cosine decays over these
  end_lr_ratio: float = 0.1  # cosine final lr = learning_rate * end_lr_ratio
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0  # <= 0 disables clipping
  grad_accum_steps: int = 1
  ema_decay: float = 0.0  # not part of tx: read by the trainer for make_train_step (0 = no EMA)

  def __post_init__(self):
    if self.schedule not in ("cosine", "constant"):
      raise ValueError(f"optimizer.schedule={self.schedule!r} must be 'cosine' or 'constant'.")
    if self.grad_accum_steps < 1:
      raise ValueError(f"optimizer.grad_accum_steps={self.grad_accum_steps} must be >= 1.")
    if self.warmup_steps < 0 or self.total_steps < 1:
      raise ValueError("optimizer.warmup_steps must be >= 0 and optimizer.total_steps >= 1.")
    if self.schedule == "cosine" and self.warmup_steps >= self.total_steps:
      raise ValueError(f"optimizer.warmup_steps={self.warmup_steps} must be < total_steps={self.total_steps}.")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "OptimizerConfig":
    return dataclass_from_dict(cls, d, "the optimizer config")


def make_lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  peak = cfg.learning_rate
  if cfg.schedule == "constant":
    if cfg.warmup_steps == 0:
      return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, cfg.warmup_steps), optax.constant_schedule(peak)], [cfg.warmup_steps])
  return optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup_steps, cfg.total_steps,
                                            end_value=peak * cfg.end_lr_ratio)


def make_optimizer(cfg: Union[OptimizerConfig, Mapping[str, Any]], total_steps: Optional[int] = None):
  """Returns ``(tx, lr_schedule)``; the schedule is indexed by optimizer update (not micro-step).

  ``cfg`` may be a dict (e.g. the ``optimizer`` section of an experiment config); ``total_steps`` (optimizer
  updates) overrides ``cfg.total_steps``.
  """
  if not isinstance(cfg, OptimizerConfig):
    cfg = OptimizerConfig.from_dict(cfg)
  if total_steps is not None:
    cfg = dataclasses.replace(cfg, total_steps=int(total_steps))
  schedule = make_lr_schedule(cfg)
  parts = []
  if cfg.clip_norm and cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
  tx = optax.chain(*parts)
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx, schedule
