"""The data, mesh, optimizer and train sections of an experiment: one frozen dataclass each, with THE defaults.

:func:`ardiff.experiment.base_config` is derived from these defaults, and the pipeline
(:func:`ardiff.data.make_dataset`), the mesh (:func:`ardiff.sharding.make_mesh`), the optimizer
(:func:`ardiff.training.optimizer.make_optimizer`) and the trainer read them, so a default lives in one place.
Every class checks its fields on construction (types, ranges, allowed values, finite floats) and names the key,
the value and the fix. This module imports nothing heavier than the standard library: config files stay cheap to
load.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

from ardiff.config import dataclass_from_dict

# The tokenizer spec prefixes that ardiff.data.tokenizers.make_tokenizer understands ("byte", "hf:/path", ...).
TOKENIZER_KINDS = ("byte", "sentencepiece", "sp", "spm", "hf", "huggingface", "tokenizers")
SCHEDULES = ("cosine", "constant")
_TYPES = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,)}


def check_value(section: str, field: dataclasses.Field, value):
  """``value`` for ``field`` of a config dataclass: its annotated type (an int is taken for a float, a bool never for
  a number; ``Optional[...]`` fields may be None) and, for a float, finite. Returns the value (a float as float)."""
  annotation = str(field.type)
  if value is None and annotation.startswith("Optional["):
    return value
  kind = annotation.removeprefix("Optional[").removesuffix("]")
  types = _TYPES.get(kind)
  if types is None:  # a type this check does not know: the class checks it itself
    return value
  if not isinstance(value, types) or (kind != "bool" and isinstance(value, bool)):
    raise ValueError(f"{section}.{field.name}={value!r} must be {'an' if kind == 'int' else 'a'} {kind}.")
  if kind == "float":
    if not math.isfinite(value):
      raise ValueError(f"{section}.{field.name}={value} is not a finite number; give a finite value "
                       f"(e.g. --config.{section}.{field.name}=<number>).")
    return float(value)
  return value


def check_dict(section: str, cls, d: Mapping[str, Any]) -> None:
  """:func:`check_value` for each known key of the dict ``d`` (a config section) before ``cls`` is built from it."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  for key, value in d.items():
    if key in fields:
      check_value(section, fields[key], value)


def check_fields(section: str, obj) -> None:
  """:func:`check_value` for every field of the dataclass ``obj`` (floats are stored as floats)."""
  for field in dataclasses.fields(obj):
    value = check_value(section, field, getattr(obj, field.name))
    if isinstance(value, float):
      object.__setattr__(obj, field.name, value)


def _at_least(section: str, obj, names, low: int) -> None:
  for name in names:
    if getattr(obj, name) < low:
      raise ValueError(f"{section}.{name}={getattr(obj, name)} must be >= {low}.")


class _Section:
  """``from_dict`` (unknown keys -> did-you-mean error), ``to_dict`` and ``replace`` for the section classes."""

  SECTION = ""

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]):
    return dataclass_from_dict(cls, d, f"config.{cls.SECTION}")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
  """What is read and how it is tokenized and packed (``config.data``; :func:`ardiff.data.make_dataset`).

  name:           "shakespeare" (embedded, offline), a TFDS name ("lm1b", "c4/en:3.0.1") or a path to a prepared
                  TFDS version directory.
  data_dir:       TFDS data dir (local, ``~`` expanded, or gs://); "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets.
  text_key:       feature holding the text; an integer array there is taken as already tokenized.
  tokenizer:      "byte" | "byte:bos,eos,mask[,pad]" | "sentencepiece:/path.model" | "hf:/path/tokenizer.json".
  seq_len:        L, the packed sequence length.
  num_threads:    grain read/transform threads (they do not change the order).
  prefetch:       grain prefetch buffer (elements).
  shuffle_buffer: extra window shuffle over packed rows (0 = off).
  pack_bins:      first-fit packing bins (0 = the per-host batch size, at least 8).
  train_split / eval_split: the TFDS splits the trainer reads (slicing allowed, "train[:10%]").

  The seed, whether to shuffle and the block alignment are not options here: the trainer derives them
  (``train.seed``, train vs eval, ``objective.block_size``) and passes them to ``make_dataset``.
  """

  SECTION = "data"

  name: str = "shakespeare"
  data_dir: str = "~/.cache/ardiff/tfds"
  text_key: str = "text"
  tokenizer: str = "byte"
  seq_len: int = 128
  num_threads: int = 2
  prefetch: int = 16
  shuffle_buffer: int = 0
  pack_bins: int = 0
  train_split: str = "train"
  eval_split: str = "validation"

  def __post_init__(self):
    check_fields("data", self)
    kind = self.tokenizer.strip().partition(":")[0].lower()
    if kind not in TOKENIZER_KINDS:
      raise ValueError(f"data.tokenizer={self.tokenizer!r}: unknown tokenizer kind {kind!r}; use one of "
                       "'byte', 'byte:bos,eos,mask[,pad]', 'sentencepiece:/path/x.model' or "
                       "'hf:/path/tokenizer.json'.")
    if self.seq_len < 2:
      raise ValueError(f"data.seq_len={self.seq_len} must be >= 2 (BOS + one token).")
    _at_least("data", self, ("num_threads", "prefetch"), 1)
    _at_least("data", self, ("shuffle_buffer", "pack_bins"), 0)
    for name in ("name", "text_key", "train_split", "eval_split"):
      if not getattr(self, name).strip():
        raise ValueError(f"data.{name} is empty; give a value (default {getattr(DataConfig, name)!r}).")


MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Section):
  """Device mesh sizes (``config.mesh``); at most one axis may be -1, filled with the remaining devices."""

  SECTION = "mesh"

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    check_fields("mesh", self)
    for axis in MESH_AXES:
      size = getattr(self, axis)
      if size != -1 and size < 1:
        raise ValueError(f"mesh.{axis}={size} must be a positive size or -1 (fill with the remaining devices).")
    fill = [a for a in MESH_AXES if getattr(self, a) == -1]
    if len(fill) > 1:
      raise ValueError(f"mesh axes {', '.join(f'{a}=-1' for a in fill)}: at most one axis may be -1; give the "
                       "others a size.")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(_Section):
  """AdamW after linear warmup, cosine (or constant) learning rate, global-norm clipping, gradient accumulation.

  ``total_steps`` (optimizer updates, not micro-steps; the cosine decays over them) is not an option of the
  ``optimizer`` config section: :func:`ardiff.experiment.validate` sets it to ``train.num_steps``. None means
  "not known yet"; :func:`ardiff.training.optimizer.make_optimizer` then needs it as an argument.
  """

  SECTION = "optimizer"

  learning_rate: float = 3e-3  # peak, reached after warmup_steps
  schedule: str = "cosine"  # "cosine" | "constant" (both after linear warmup)
  warmup_steps: int = 50
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  weight_decay: float = 0.01
  clip_norm: float = 1.0  # <= 0 disables clipping
  end_lr_ratio: float = 0.1  # cosine final lr = learning_rate * end_lr_ratio
  grad_accum_steps: int = 1
  ema_decay: float = 0.0  # not part of the optimizer: the trainer keeps an EMA of the params when > 0
  total_steps: Optional[int] = None  # derived (train.num_steps), see above

  def __post_init__(self):
    check_fields("optimizer", self)
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optimizer.schedule={self.schedule!r} must be one of {SCHEDULES}.")
    if self.learning_rate < 0:
      raise ValueError(f"optimizer.learning_rate={self.learning_rate} must be >= 0.")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      raise ValueError(f"optimizer.b1={self.b1} and optimizer.b2={self.b2} must lie in [0, 1).")
    if not 0 <= self.ema_decay < 1:
      raise ValueError(f"optimizer.ema_decay={self.ema_decay} must lie in [0, 1) (0 = no EMA).")
    if self.eps <= 0 or self.weight_decay < 0 or self.end_lr_ratio < 0:
      raise ValueError(f"optimizer.eps={self.eps} must be > 0, optimizer.weight_decay={self.weight_decay} and "
                       f"optimizer.end_lr_ratio={self.end_lr_ratio} >= 0.")
    _at_least("optimizer", self, ("grad_accum_steps",), 1)
    _at_least("optimizer", self, ("warmup_steps",), 0)
    if self.total_steps is not None:
      if self.total_steps < 1:
        raise ValueError(f"optimizer.total_steps={self.total_steps} must be >= 1.")
      self.check_total_steps(self.total_steps)

  def check_total_steps(self, total_steps: int, name: str = "total_steps") -> None:
    """A cosine schedule must warm up in fewer than ``total_steps`` updates."""
    if self.schedule == "cosine" and self.warmup_steps >= total_steps:
      raise ValueError(f"optimizer.warmup_steps={self.warmup_steps} must be < {name}={total_steps} with the "
                       "cosine schedule; lower the warmup or train longer.")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
  """The training run (``config.train``): where it is written, batch, length, logging, checkpoints, samples.

  batch_size is the global batch of one optimizer update (split into ``optimizer.grad_accum_steps``
  micro-batches); ``num_steps``, ``log_every``, ``eval_every`` and ``save_every`` count optimizer updates.
  ``resume`` continues from the run directory's latest checkpoint; otherwise ``init_from`` (a run or params
  directory, "" = none) gives the initial parameters. ``resume=False`` refuses a run directory that already holds
  checkpoints (it would replace that run's config and metrics): start fresh runs in a new ``run_dir``.
  """

  SECTION = "train"

  run_dir: str = "runs/default"
  batch_size: int = 16
  num_steps: int = 300
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  save_every: int = 100
  keep_checkpoints: int = 2
  num_samples: int = 4  # texts generated at the end of the run (0 = none)
  sample_tokens: int = 128  # new tokens per sample, capped to data.seq_len minus the prompt
  sample_temperature: float = 1.0  # the end-of-run samples' temperature (0 = greedy) and top-p
  sample_top_p: float = 0.9
  resume: bool = True
  init_from: str = ""

  def __post_init__(self):
    check_fields("train", self)
    _at_least("train", self, ("batch_size", "num_steps", "log_every", "eval_every", "save_every",
                              "keep_checkpoints"), 1)
    _at_least("train", self, ("seed", "eval_batches", "num_samples", "sample_tokens"), 0)
    if self.sample_temperature < 0 or not 0 < self.sample_top_p <= 1:
      raise ValueError(f"train.sample_temperature={self.sample_temperature} must be >= 0 (0 = greedy) and "
                       f"train.sample_top_p={self.sample_top_p} in (0, 1].")
    if not self.run_dir.strip():
      raise ValueError("train.run_dir is empty; give the directory to write the run to, e.g. "
                       "--config.train.run_dir=runs/my_run.")


IMAGE_DATASETS = {"digits": 8, "fashion_mnist": 28, "mnist": 28, "kmnist": 28, "cifar10": 32}  # native side
IMAGE_FILE_DATASETS = ("digits", "fashion_mnist")  # image.source="files"; all but digits also through TFDS
IMAGE_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class ImageConfig(_Section):
  """Image experiments (``config.image``, optional; :mod:`ardiff.images`, docs/images.md). Present = the run trains
  on images: ``kind="discrete"`` runs the text backbone and objective on grey-level tokens, ``"continuous"`` the
  ACDiT model (patch vectors, rectified flow inside blocks of ``objective.block_size`` patches).

  dataset:        "digits" (vendored) | "fashion_mnist" (Debian dataset-fashion-mnist under data_dir) | with
                  source="tfds" also "mnist" | "kmnist" | "cifar10" (grey: BT.601 luma).
  source:         "files" (digits vendored, Fashion-MNIST IDX) | "tfds" (a prepared TFDS array_record dataset
                  named ``dataset`` under data_dir; ``python -m ardiff images prepare`` writes Fashion-MNIST's).
  data_dir:       files: Fashion-MNIST IDX directory ("" = /usr/share/datasets/fashion-mnist); tfds: the TFDS
                  data dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets).
  size:           side after mean-pooling (0 = native: 8 digits, 28 Fashion-MNIST).
  kind:           "discrete" | "continuous".
  levels:         discrete: grey levels (token ids 0..levels-1; then 10 class ids, then [MASK]).
  order:          discrete token order: "raster" (a block of B = k rows when B = k * side) or "patch" (patch_size^2
                  pixels of one patch, patches in raster order: a block of patch_size^2 tokens = one patch).
  patch_size:     patch side (continuous tokens; discrete order="patch").
  label_dropout:  continuous: probability of training with the null class (classifier-free guidance).
  cfg_scale:      continuous: guidance scale at sampling (1 = plain conditional).
  denoise_steps:  continuous: Euler steps per block at sampling.
  """

  SECTION = "image"

  dataset: str = "digits"
  source: str = "files"
  data_dir: str = ""
  size: int = 0
  kind: str = "discrete"
  levels: int = 17
  order: str = "raster"
  patch_size: int = 2
  label_dropout: float = 0.1
  cfg_scale: float = 2.0
  denoise_steps: int = 16

  def __post_init__(self):
    check_fields("image", self)
    if self.dataset not in IMAGE_DATASETS:
      raise ValueError(f"image.dataset={self.dataset!r} must be one of {sorted(IMAGE_DATASETS)}.")
    if self.source not in ("files", "tfds"):
      raise ValueError(f"image.source={self.source!r} must be 'files' or 'tfds'.")
    if (self.source == "files") != (self.dataset in IMAGE_FILE_DATASETS) and self.dataset != "fashion_mnist":
      raise ValueError(f"image.dataset={self.dataset!r} cannot be read with image.source={self.source!r}: digits is "
                       "vendored (source='files'); mnist, kmnist and cifar10 are read through TFDS (source='tfds').")
    for name, allowed in (("kind", ("discrete", "continuous")), ("order", ("raster", "patch"))):
      if getattr(self, name) not in allowed:
        raise ValueError(f"image.{name}={getattr(self, name)!r} must be one of {allowed}.")
    if self.size < 0 or (self.size and IMAGE_DATASETS[self.dataset] % self.size):
      raise ValueError(f"image.size={self.size} must be 0 (native) or divide the native side "
                       f"{IMAGE_DATASETS[self.dataset]} of {self.dataset}.")
    if not 2 <= self.levels <= 256:
      raise ValueError(f"image.levels={self.levels} must lie in [2, 256].")
    _at_least("image", self, ("patch_size", "denoise_steps"), 1)
    if self.side % self.patch_size:
      raise ValueError(f"image.patch_size={self.patch_size} must divide the image side {self.side}.")
    if not 0.0 <= self.label_dropout < 1.0 or self.cfg_scale < 0:
      raise ValueError(f"image.label_dropout={self.label_dropout} must lie in [0, 1) and image.cfg_scale="
                       f"{self.cfg_scale} be >= 0.")

  @property
  def side(self) -> int:
    return self.size or IMAGE_DATASETS[self.dataset]

  @property
  def num_tokens(self) -> int:
    """Pixels (discrete) or patches (continuous) per image."""
    return self.side ** 2 if self.kind == "discrete" else (self.side // self.patch_size) ** 2

  @property
  def mask_id(self) -> int:
    return self.levels + IMAGE_CLASSES

  def check(self, model, objective, data) -> None:
    """Cross-section checks (sizes the image fixes), naming the value and the fix."""
    n = self.num_tokens
    if self.kind == "continuous":
      if data.seq_len != n:
        raise ValueError(f"data.seq_len={data.seq_len} must be the number of {self.patch_size}x{self.patch_size} "
                         f"patches, {n}, for continuous {self.side}x{self.side} images; set data.seq_len={n}.")
      if objective.kind != "block_diffusion":
        raise ValueError(f"image.kind='continuous' trains blocks of objective.block_size patches; set "
                         f"objective.kind='block_diffusion' (got {objective.kind!r}).")
      return
    if data.seq_len <= n:
      raise ValueError(f"data.seq_len={data.seq_len} must be the {n} pixels plus a class prefix (>= 1 token), "
                       f"e.g. data.seq_len={n + 1} (AR, MDLM) or {n} + objective.block_size (block diffusion).")
    if objective.kind == "tidar":
      raise ValueError("image.kind='discrete' supports objective.kind 'ar' and 'block_diffusion', not 'tidar'.")
    if model.vocab_size != self.mask_id + 1:
      raise ValueError(f"model.vocab_size={model.vocab_size} must be levels + 10 classes + [MASK] = "
                       f"{self.mask_id + 1}; set model.vocab_size={self.mask_id + 1}.")
    if objective.kind != "ar" and model.mask_token_id != self.mask_id:
      raise ValueError(f"model.mask_token_id={model.mask_token_id} must be {self.mask_id} (after the {self.levels} "
                       f"grey levels and 10 class ids); set model.mask_token_id={self.mask_id}.")
    if self.order == "patch" and self.side % self.patch_size:
      raise ValueError(f"image.patch_size={self.patch_size} must divide the side {self.side} for order='patch'.")
