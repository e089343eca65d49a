"""Experiment configs: the ml-collections layout shared by every file in ``configs/``, and its validation.

A config has the sections ``model``, ``objective``, ``data``, ``mesh``, ``optimizer`` and ``train`` (plus ``name``
and the sharding ``rules``); each is a frozen dataclass (:mod:`ardiff.config`, :mod:`ardiff.sections`,
:class:`ardiff.objectives.ObjectiveConfig`) whose defaults :func:`base_config` copies, so a default lives in one
place. ``validate(config)`` turns a config into an :class:`Experiment` of those typed sections and stops with a
message naming the value and the fix: unknown keys in any section (with a did-you-mean), a value of the wrong type,
an unknown enum value, a block size that does not divide the sequence length, a batch that the data-parallel mesh
axes do not divide, a [MASK] id outside the vocabulary, and so on.

Config files import only this module (and what it imports: no orbax, optax, grain or TFDS), so loading one is
cheap.
:func:`parse_config_args` reads the ``KEY=VALUE,...`` argument of ``--config FILE:ARG``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Mapping

import ml_collections

from ardiff import sharding
from ardiff.config import ModelConfig, unknown_keys_error
from ardiff.objectives.base import ObjectiveConfig
from ardiff.sections import DataConfig, ImageConfig, MeshConfig, OptimizerConfig, TrainConfig, check_dict

# The section classes, in config order. optimizer.total_steps is derived from train.num_steps, never configured.
SECTION_TYPES = {"model": ModelConfig, "objective": ObjectiveConfig, "data": DataConfig, "mesh": MeshConfig,
                 "optimizer": OptimizerConfig, "train": TrainConfig}
DERIVED = {"optimizer": ("total_steps",)}
TOP_LEVEL = set(SECTION_TYPES) | {"rules", "name", "image"}  # image: optional (ardiff.images)
BYTE_MASK_ID = 258  # the byte tokenizer's [MASK] (256 bytes, then BOS, EOS, MASK)



def section_keys(name: str) -> tuple:
  """The keys a config's ``name`` section may hold."""
  return tuple(f.name for f in dataclasses.fields(SECTION_TYPES[name]) if f.name not in DERIVED.get(name, ()))


def _defaults(name: str) -> ml_collections.ConfigDict:
  d = dataclasses.asdict(SECTION_TYPES[name]())
  return ml_collections.ConfigDict({k: d[k] for k in section_keys(name)})


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every field, taken from the section dataclasses; experiment files override what they change."""
  c = ml_collections.ConfigDict()
  c.name = "bd3_shakespeare_b4"
  for name in SECTION_TYPES:
    c[name] = _defaults(name)
  c.model.mask_token_id = BYTE_MASK_ID  # a diffusion model needs one; the default tokenizer is "byte"
  # Logical axis -> mesh axes: the one table that decides sharding (see ardiff/sharding.py).
  c.rules = sharding.DEFAULT_RULES
  return c


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The validated, typed view of a config; ``optimizer.total_steps`` is ``train.num_steps``."""

  name: str
  model: ModelConfig
  objective: ObjectiveConfig
  data: DataConfig
  mesh: MeshConfig
  rules: tuple
  optimizer: OptimizerConfig
  train: TrainConfig
  raw: Any  # the ConfigDict, kept to be saved next to checkpoints (config.json)
  image: Any = None  # ImageConfig when the config has an image section (ardiff.images), else None


def _section_dict(config, name) -> dict:
  section = config[name]
  if isinstance(section, ml_collections.ConfigDict):
    return section.to_dict()
  if isinstance(section, Mapping):
    return dict(section)
  raise ValueError(f"config.{name} must be a section (a ConfigDict of keys), got {section!r}.")


def _typed(config, name):
  d = _section_dict(config, name)
  unknown = set(d) - set(section_keys(name))
  if unknown:  # derived keys too: total_steps would silently disagree with train.num_steps
    if name == "optimizer" and "total_steps" in unknown:
      raise ValueError("config.optimizer.total_steps is derived from train.num_steps; remove it.")
    raise unknown_keys_error(f"config.{name}", unknown, section_keys(name))
  # types and finite floats (NaN/inf hyperparameters would train to NaN params silently) before the section's own
  # checks, which may compare numbers
  check_dict(name, SECTION_TYPES[name], d)
  return SECTION_TYPES[name].from_dict(d)


# One mesh constructor: make_mesh(exp) (or make_mesh(exp.mesh), or the three sizes) builds the experiment's mesh.
make_mesh = sharding.make_mesh


def _rules(config) -> tuple:
  return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.rules)


def validate(config: ml_collections.ConfigDict, *, devices=None) -> Experiment:
  """Checks every section; with ``devices`` also the batch/model divisibility on the mesh they form."""
  unknown = set(config.keys()) - TOP_LEVEL
  if unknown:
    raise unknown_keys_error("the config", unknown, TOP_LEVEL)
  # train first: a bad num_steps is named itself, not as the optimizer's derived total_steps
  train = _typed(config, "train")
  model, objective, data, mesh, opt = (_typed(config, s) for s in ("model", "objective", "data", "mesh", "optimizer"))
  opt.check_total_steps(train.num_steps, "train.num_steps")
  opt = opt.replace(total_steps=train.num_steps)
  objective.check_seq_len(data.seq_len)
  if objective.kind != "ar" and model.mask_token_id is None:
    raise ValueError(f"objective.kind={objective.kind!r} needs model.mask_token_id (the tokenizer's [MASK] id).")
  if train.batch_size % opt.grad_accum_steps:
    raise ValueError(f"optimizer.grad_accum_steps={opt.grad_accum_steps} must divide "
                     f"train.batch_size={train.batch_size}.")
  image = None
  if config.get("image") is not None:
    image_dict = _section_dict(config, "image")
    check_dict("image", ImageConfig, image_dict)
    image = ImageConfig.from_dict(image_dict)
    image.check(model, objective, data)
  else:  # image runs feed pixel tokens, not data.tokenizer's
    check_tokenizer(model, objective.kind, data.tokenizer)
  exp = Experiment(name=str(config.get("name", "experiment")), model=model, objective=objective, data=data,
                   mesh=mesh, rules=_rules(config), optimizer=opt, train=train, raw=config, image=image)
  if devices is not None:
    _check_on_devices(exp, devices)
  return exp


def _tokenizer_file_missing(spec: str) -> bool:
  kind, _, arg = spec.strip().partition(":")
  return kind.lower() != "byte" and ("://" in arg or not os.path.isfile(os.path.expanduser(arg)))


def check_tokenizer(model: ModelConfig, objective_kind: str, spec: str) -> None:
  """``model.vocab_size`` holds every id of the tokenizer ``spec`` and, for a diffusion objective,
  ``model.mask_token_id`` is the tokenizer's [MASK]; one message names every mismatch and the flags that fix it.

  A tokenizer file that is not there (a placeholder path of a TPU config that is only compiled, or a URL) is not
  opened here: the data pipeline names a missing file when it first reads data.
  """
  if _tokenizer_file_missing(spec):
    return
  from ardiff.data.tokenizers import make_tokenizer  # local: config files stay cheap to load
  tok = make_tokenizer(spec)
  wrong, fix = [], []
  if tok.vocab_size > model.vocab_size:
    wrong.append(f"it has {tok.vocab_size} ids but model.vocab_size={model.vocab_size}")
    fix.append(f"--config.model.vocab_size={tok.vocab_size}")
  if objective_kind != "ar" and tok.mask_id is not None and tok.mask_id != model.mask_token_id:
    wrong.append(f"its [MASK] id is {tok.mask_id} but model.mask_token_id={model.mask_token_id}")
    fix.append(f"--config.model.mask_token_id={tok.mask_id}")
  if wrong:
    raise ValueError(f"data.tokenizer={spec!r} does not fit the model: {'; '.join(wrong)}. Fix: {' '.join(fix)}.")


def _check_on_devices(exp: Experiment, devices) -> None:
  sizes = dict(sharding.make_mesh(exp, devices=devices).shape)
  dp = sizes["data"] * sizes["fsdp"]
  micro = exp.train.batch_size // exp.optimizer.grad_accum_steps
  if micro % dp:
    raise ValueError(f"train.batch_size={exp.train.batch_size} (micro-batch {micro}) is not divisible by the "
                     f"data-parallel size data*fsdp={dp} of mesh {sizes}; use a multiple of {dp}.")
  sharding.check_divisibility(exp.model, sizes, exp.rules)


def parse_config_args(arg: str | None, defaults: Mapping[str, Any], config_file: str) -> dict:
  """``"k=v,k2=v2"`` (the ``ARG`` of ``--config FILE:ARG``) -> ``defaults`` updated, each value of its default's
  type (a default of None takes the text). Unknown keys get a did-you-mean error naming ``config_file``."""
  out = dict(defaults)
  usage = f"{config_file}:" + ",".join(f"{k}=..." for k in defaults)
  for item in (arg or "").split(","):
    if not item.strip():
      continue
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq:
      raise ValueError(f"--config {config_file}:{arg}: {item!r} is not KEY=VALUE; use {usage}.")
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1)
      raise ValueError(f"--config {config_file}:{arg}: unknown argument {key!r}"
                       + (f" (did you mean {close[0]!r}?)" if close else "")
                       + f"; known arguments: {', '.join(defaults)} ({usage}).")
    default = defaults[key]
    if isinstance(default, bool) or not isinstance(default, (int, float)):
      out[key] = text
      continue
    try:
      out[key] = type(default)(text)
    except ValueError:
      kind = "an integer" if isinstance(default, int) else "a number"
      raise ValueError(f"--config {config_file}:{arg}: {key}={text!r} is not {kind} (default {default!r}).") from None
  return out
