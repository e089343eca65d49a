"""The run-directory format, read and written here only (training, eval, sample, export and ``init_from`` alike).

A run directory (``ardiff train``, ``ardiff convert``) holds::

  config.json     the experiment config (ml_collections JSON)
  checkpoints/    orbax steps: {state, data iterator, config}; a damaged step is moved aside as <step>.corrupt-*
  metrics.jsonl   one JSON line per logged step ({"step": S, "loss": ...} / {"step": S, "eval/...": ...})
  tb/             TensorBoard events
  samples.txt, loss.png   written at the end of training

Paths are ``etils.epath`` paths: a local path (``~`` expanded) or a URL such as ``gs://bucket/run`` (never made
absolute). A params directory (``ardiff export --to params``, :mod:`ardiff.checkpoints.params_dir`) is accepted
wherever a run directory is read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional, Tuple

import jax
import ml_collections

from ardiff import experiment as experiment_lib
from ardiff import sharding
from ardiff.checkpoints import params_dir as params_lib
from ardiff.checkpoints.checkpointer import MissingItemError, restore_latest
from ardiff.checkpoints.paths import as_path, is_url
from ardiff.config import ModelConfig
from ardiff.model import Transformer

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


# ---------------------------------------------------------------------------------------------------- config
def read_config(run_dir) -> Tuple[ml_collections.ConfigDict, ModelConfig]:
  """``(ConfigDict, ModelConfig)`` of the ``config.json`` in ``run_dir``; a clear error when it is missing or not
  an experiment config."""
  path = as_path(run_dir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {run_dir} is not a run directory written by `ardiff train` "
                            "(or a params directory written by `ardiff export --to params`).")
  try:
    raw = json.loads(path.read_text())
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{path} is not valid JSON ({e}); the run directory is damaged. Restore config.json from a "
                     "copy (each checkpoint also holds the config: checkpoints/<step>/config).") from None
  if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
    raise ValueError(f"{path} is not an experiment config (no 'model' section); the run directory is damaged.")
  config = ml_collections.ConfigDict(raw)
  if "rules" in config:
    config.rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.rules)
  try:
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: its model section is not a valid model config ({e}).") from None
  return config, model_cfg


def write_config(run_dir, config: ml_collections.ConfigDict) -> None:
  """Writes ``config.json`` whole (to a temporary name, then renamed: a crash never leaves half a file)."""
  path = as_path(run_dir) / CONFIG_FILE
  tmp = path.parent / f".{CONFIG_FILE}.tmp"
  tmp.write_text(config.to_json_best_effort(indent=2))
  tmp.replace(path)


# ------------------------------------------------------------------------------------------------ parameters
def restore_params(ckpt_dir, target, *, use_ema: bool = False):
  """Only the parameters (or their EMA) of the latest restorable train-state checkpoint, onto ``target``'s
  shardings; the optimizer state is never read, so a checkpoint of another objective or optimizer loads too.
  A corrupt latest step is moved aside and the previous one used
  (:func:`ardiff.checkpoints.checkpointer.restore_latest`).
  """
  import orbax.checkpoint as ocp
  ckpt_dir = as_path(ckpt_dir)
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"no checkpoint directory at {ckpt_dir}; pass a run directory written by `ardiff train`.")
  key = "ema_params" if use_ema else "params"
  item = {key: target}
  mngr = ocp.CheckpointManager(ckpt_dir, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    def restore_one(step):
      try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
      except TypeError as e:  # a run saved without EMA stores ema_params=None: orbax's "Type mismatch" there
        if use_ema and "ema_params" in str(e):
          raise MissingItemError(f"checkpoint {ckpt_dir}/{step} holds no EMA parameters (the run was trained "
                                 "without optimizer.ema_decay): drop --ema (use_ema), or train with "
                                 "--config.optimizer.ema_decay=0.999 to keep one.") from None
        raise
      if out.state.get(key) is None:
        raise MissingItemError(f"checkpoint {ckpt_dir}/{step} has no {key!r} (was the run trained with an EMA?).")
      return jax.block_until_ready(out.state[key])  # read errors surface here, inside the fallback
    _, params = restore_latest(ckpt_dir, mngr.all_steps(), restore_one)
  finally:
    mngr.close()
  return params


def save_params_checkpoint(params, ckpt_dir, step: int = 0) -> str:
  """``{"params": params}`` as step ``step`` of an orbax checkpoint directory (``<run_dir>/checkpoints``): the
  train-state layout without optimizer state, which :func:`restore_params` reads (``ardiff convert`` writes its run
  directories so; ``init_from`` and ``ardiff eval`` take them). Returns the step's path."""
  import orbax.checkpoint as ocp
  ckpt_dir = as_path(ckpt_dir)
  mngr = ocp.CheckpointManager(ckpt_dir, item_handlers={"state": ocp.StandardCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(create=True))
  try:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})), force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return str(ckpt_dir / str(step))


def load_params(path, model: Transformer, mesh, rules):
  """Parameters for ``train.init_from``, on this mesh: the latest checkpoint of a run directory (``ardiff train``
  or ``ardiff convert``), a checkpoints directory, or a params directory (``ardiff export --to params``). Only
  ``model``'s weight layout must match the source (objective, optimizer and dtype may differ)."""
  path = as_path(path)
  if params_lib.is_params_dir(path):
    return params_lib.load_params_dir(path, mesh=mesh, rules=rules, target=model.config)[1]
  ckpt_dir = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
  if (ckpt_dir.parent / CONFIG_FILE).exists():  # a clear message instead of orbax's shape/structure error
    params_lib.check_compatible(read_config(ckpt_dir.parent)[1], model.config, str(ckpt_dir))
  abstract, shardings = sharding.abstract_params_and_shardings(model, mesh, rules)
  return restore_params(ckpt_dir, sharding.with_shardings(abstract, shardings))


def load_run(run_dir, *, use_ema: bool = False):
  """``(experiment, model, params)`` of a run, on a mesh of this host's devices.

  ``run_dir`` is a run directory (latest restorable checkpoint; ``use_ema`` picks the EMA parameters) or a params
  directory of ``ardiff export --to params`` (recognised by its ``model_config.json``; it holds one set of
  parameters, so ``use_ema`` must match how it was exported).
  """
  run_dir = as_path(run_dir)
  is_params_dir = params_lib.is_params_dir(run_dir)
  if is_params_dir and not (run_dir / CONFIG_FILE).exists():
    raise FileNotFoundError(f"{run_dir}/config.json not found: this params directory carries no experiment config "
                            "(tokenizer, objective, data). Export it from a run with `ardiff export --to params`, "
                            "or read the bare parameters with ardiff.checkpoints.params_dir.load_params_dir.")
  config, _ = read_config(run_dir)
  if is_params_dir:
    params_lib.resolve_tokenizer_path(config, str(run_dir))  # the exported tokenizer file sits in the directory
  exp = experiment_lib.validate(config)
  mesh = sharding.make_mesh(exp)
  model = Transformer(exp.model)
  if is_params_dir:
    exported_ema = bool(params_lib.read_meta(run_dir).get("use_ema", False))
    if use_ema and not exported_ema:
      raise ValueError(f"{run_dir} holds the raw parameters, not the EMA; export the EMA with "
                       "`ardiff export --to params --ema` or drop --ema.")
    _, params = params_lib.load_params_dir(run_dir, mesh=mesh, rules=exp.rules, target=exp.model)
    return exp, model, params
  abstract, shardings = sharding.abstract_params_and_shardings(model, mesh, exp.rules)
  params = restore_params(run_dir / CHECKPOINTS, sharding.with_shardings(abstract, shardings), use_ema=use_ema)
  return exp, model, params


# ------------------------------------------------------------------------------------------------- metrics log
def _step_of(line: str) -> Optional[int]:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None  # a line cut by a kill -9, or not a record: dropped


def rewind_metrics(path, step: int) -> list:
  """Keeps only the records of ``metrics.jsonl`` with ``step <= step`` (rewritten atomically); returns them.

  Called when a run (re)starts at ``step``: the lines a killed or crashed run wrote after its last checkpoint
  would otherwise be written again by the replayed steps."""
  path = as_path(path)
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  kept = [ln for ln in lines if (s := _step_of(ln)) is not None and s <= step]
  if kept != lines:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text("".join(ln + "\n" for ln in kept))
    tmp.replace(path)
  return kept


class MetricsLog:
  """``metrics.jsonl`` opened for a run starting at ``start_step`` (later records dropped first, see
  :func:`rewind_metrics`); every record is flushed when written. Object stores (URLs) cannot append, so there the
  whole (small) file is rewritten per record."""

  def __init__(self, path, start_step: int):
    self.path = as_path(path)
    kept = rewind_metrics(self.path, start_step)
    self._url = is_url(self.path)
    self._lines = kept if self._url else None
    self._file = None if self._url else open(self.path, "a")

  def write(self, record: dict) -> None:
    line = json.dumps(record)
    if self._url:
      self._lines.append(line)
      self.path.write_text("".join(ln + "\n" for ln in self._lines))
    else:
      self._file.write(line + "\n")
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


# ------------------------------------------------------------------------------------------------- TensorBoard
class TensorBoard:
  """tensorboardX's ``SummaryWriter`` on ``run_dir/tb`` for a run starting at ``start_step``.

  ``purge_step=start_step + 1``: TensorBoard discards the events earlier writers logged after ``start_step`` (the
  steps a killed or crashed run logged after its last checkpoint, about to be replayed), so every step shows once.
  tensorboardX writes local files only (``gs://`` needs google-cloud-storage; any other URL would become a local
  ``./gs:/...`` directory), so for a URL run directory the events go to a local temporary directory and are copied
  to ``run_dir/tb`` by :meth:`flush` and :meth:`close`.
  """

  def __init__(self, run_dir, start_step: int):
    from tensorboardX import SummaryWriter
    self.directory = as_path(run_dir) / TB_DIR
    self._staging = tempfile.mkdtemp(prefix="ardiff-tb-") if is_url(self.directory) else None
    self._writer = SummaryWriter(self._staging or str(self.directory),
                                 purge_step=start_step + 1 if start_step else None)

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._writer.add_scalar(tag, value, step)

  def flush(self) -> None:
    self._writer.flush()
    self._upload()

  def close(self) -> None:
    if self._writer is None:
      return
    self._writer.close()  # drains tensorboardX's queue: every event is in the local file now
    self._writer = None
    self._upload()
    if self._staging is not None:
      shutil.rmtree(self._staging, ignore_errors=True)

  def _upload(self) -> None:
    if self._staging is None:
      return
    self.directory.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self._staging):  # whole files: an object store cannot append
      with open(os.path.join(self._staging, name), "rb") as f:
        (self.directory / name).write_bytes(f.read())
