"""Experiment configs: the ml-collections layout shared by every file in ``configs/``, and its validation.

``validate(config)`` runs at load time and stops with a message naming the value and the fix: unknown keys in any
section, a block size that does not divide the sequence length, a batch that the data-parallel mesh axes do not
divide, a [MASK] id outside the vocabulary, and so on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from ardiff import sharding
from ardiff.config import ModelConfig, unknown_keys_error
from ardiff.objectives import ObjectiveConfig
from ardiff.training.optimizer import OptimizerConfig

SECTIONS = {
    "model": None,  # ModelConfig fields
    "objective": None,  # ObjectiveConfig fields
    "data": ("name", "data_dir", "text_key", "tokenizer", "seq_len", "num_threads", "train_split", "eval_split"),
    "mesh": ("data", "fsdp", "tensor"),
    "optimizer": None,  # OptimizerConfig fields (total_steps comes from train.num_steps)
    "train": ("run_dir", "batch_size", "num_steps", "seed", "log_every", "eval_every", "eval_batches",
              "save_every", "keep_checkpoints", "num_samples", "sample_tokens", "resume", "init_from"),
}
TOP_LEVEL = set(SECTIONS) | {"rules", "name"}


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every field; experiment files override what they change."""
  c = ml_collections.ConfigDict()
  c.name = "bd3_shakespeare_b4"
  c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))
  c.model.mask_token_id = 258  # the byte tokenizer's [MASK] (256 bytes, then BOS, EOS, MASK)
  c.objective = ml_collections.ConfigDict(dataclasses.asdict(ObjectiveConfig()))
  c.data = ml_collections.ConfigDict(dict(name="shakespeare", data_dir="~/.cache/ardiff/tfds", text_key="text",
                                          tokenizer="byte", seq_len=128, num_threads=2,
                                          train_split="train", eval_split="validation"))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Logical axis -> mesh axes: the one table that decides sharding (see ardiff/sharding.py).
  c.rules = sharding.DEFAULT_RULES
  c.optimizer = ml_collections.ConfigDict(dict(learning_rate=3e-3, schedule="cosine", warmup_steps=50, b1=0.9,
                                               b2=0.99, eps=1e-8, weight_decay=0.01, clip_norm=1.0, end_lr_ratio=0.1,
                                               grad_accum_steps=1, ema_decay=0.0))
  c.train = ml_collections.ConfigDict(dict(run_dir="runs/default", batch_size=16, num_steps=300, seed=0,
                                           log_every=10, eval_every=100, eval_batches=8, save_every=100,
                                           keep_checkpoints=2, num_samples=4, sample_tokens=128, resume=True,
                                           init_from=""))
  return c


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The validated, typed view of a config."""

  name: str
  model: ModelConfig
  objective: ObjectiveConfig
  data: dict
  mesh: dict
  rules: tuple
  optimizer: dict
  train: dict
  raw: Any  # the ConfigDict, kept to be saved next to checkpoints


def _section(config, name) -> dict:
  d = config[name].to_dict() if isinstance(config[name], ml_collections.ConfigDict) else dict(config[name])
  known = SECTIONS[name]
  if known is not None:
    unknown = set(d) - set(known)
    if unknown:
      raise unknown_keys_error(f"config.{name}", unknown, known)
  return d


def _check_finite(config) -> None:
  """NaN/inf hyperparameters (e.g. ``--config.optimizer.learning_rate=nan``) would train to NaN params silently."""
  for section in SECTIONS:
    values = config[section].to_dict() if isinstance(config[section], ml_collections.ConfigDict) else {}
    for key, value in values.items():
      if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{section}.{key}={value} is not a finite number; give a finite value "
                         f"(e.g. --config.{section}.{key}=<number>).")


def validate(config: ml_collections.ConfigDict, *, devices=None) -> Experiment:
  """Checks every section; with ``devices`` also the batch/model divisibility on the mesh they form."""
  unknown = set(config.keys()) - TOP_LEVEL
  if unknown:
    raise unknown_keys_error("the config", unknown, TOP_LEVEL)
  _check_finite(config)
  model = ModelConfig.from_dict(_section(config, "model"))
  objective = ObjectiveConfig.from_dict(_section(config, "objective"))
  data, mesh, opt, train = (_section(config, s) for s in ("data", "mesh", "optimizer", "train"))

  for key in ("batch_size", "num_steps", "log_every", "eval_every", "save_every", "keep_checkpoints"):
    if int(train[key]) < 1:  # before the optimizer check, which would name the derived total_steps instead
      raise ValueError(f"train.{key}={train[key]} must be >= 1.")
  seq_len = data["seq_len"]
  objective.check_seq_len(seq_len)
  if objective.kind != "ar" and model.mask_token_id is None:
    raise ValueError(f"objective.kind={objective.kind!r} needs model.mask_token_id (the tokenizer's [MASK] id).")
  if "total_steps" in opt:
    raise ValueError("config.optimizer.total_steps is derived from train.num_steps; remove it.")
  OptimizerConfig.from_dict({**opt, "total_steps": int(train["num_steps"])})  # raises with the reason
  if int(opt["grad_accum_steps"]) < 1 or train["batch_size"] % int(opt["grad_accum_steps"]):
    raise ValueError(f"optimizer.grad_accum_steps={opt['grad_accum_steps']} must be >= 1 and divide "
                     f"train.batch_size={train['batch_size']}.")
  for axis in ("data", "fsdp", "tensor"):
    if mesh[axis] != -1 and int(mesh[axis]) < 1:
      raise ValueError(f"mesh.{axis}={mesh[axis]} must be a positive size or -1 (fill with the remaining devices).")
  if devices is not None:
    sizes = dict(sharding.make_mesh(**{a: int(mesh[a]) for a in sharding.MESH_AXES}, devices=devices).shape)
    dp = sizes["data"] * sizes["fsdp"]
    micro = train["batch_size"] // int(opt["grad_accum_steps"])
    if micro % dp:
      raise ValueError(f"train.batch_size={train['batch_size']} (micro-batch {micro}) is not divisible by the "
                       f"data-parallel size data*fsdp={dp} of mesh {sizes}; use a multiple of {dp}.")
    tensor = sizes["tensor"]
    for name in ("num_heads", "num_kv_heads", "mlp_dim"):
      if getattr(model, name) % tensor:
        raise ValueError(f"model.{name}={getattr(model, name)} is not divisible by mesh.tensor={tensor}.")
  return Experiment(name=str(config.get("name", "experiment")), model=model, objective=objective, data=data,
                    mesh=mesh, rules=tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                                           for k, v in config.rules), optimizer=opt, train=train, raw=config)
