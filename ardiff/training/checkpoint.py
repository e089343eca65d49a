"""Orbax CheckpointManager wrapper: train state + grain iterator + JSON config, async, restore on any mesh.

Orbax writes each step into a temporary directory and renames it when complete, so unfinished saves are never
listed as steps. A finalized step can still be damaged afterwards (files deleted/truncated); ``restore`` then
warns and falls back to the previous step.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _grain_checkpoint():
  import grain  # lazy: only needed when an iterator is checkpointed
  return grain.checkpoint


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 3, save_every: int = 1000, async_save: bool = True,
               **kwargs):
    if "async" in kwargs:  # Checkpointer(dir, ..., **{"async": False})
      async_save = kwargs.pop("async")
    if kwargs:
      raise TypeError(f"Unknown Checkpointer arguments: {sorted(kwargs)}.")
    self.directory = os.path.abspath(os.fspath(directory))
    handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    try:
      handlers["data"] = _grain_checkpoint().CheckpointHandler()
    except ImportError:  # pragma: no cover
      pass
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_every,
                                             enable_async_checkpointing=async_save, create=True),
        item_handlers=handlers)

  # ------------------------------------------------------------------ save
  def save(self, step: int, state: Any, data_iter=None, config_dict: Optional[dict] = None,
           force: bool = False) -> bool:
    """Save ``state`` (plain arrays), optionally the grain iterator and a JSON config; returns whether it saved."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = _grain_checkpoint().CheckpointSave(data_iter)
    if config_dict is not None:
      items["config"] = ocp.args.JsonSave(config_dict)
    return self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)

  # --------------------------------------------------------------- restore
  def all_steps(self):
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def restore(self, target: Any, data_iter=None, step: Optional[int] = None, with_config: bool = False):
    """Restore the latest (or given) step onto the shardings carried by ``target`` (ShapeDtypeStructs).

    Returns ``(step, state)`` or ``(step, state, config_dict)`` with ``with_config``; ``(None, None[, None])``
    if there is no checkpoint. ``data_iter`` is restored in place. A step that fails to restore is skipped with
    a warning and the previous one is tried.
    """
    self._mngr.wait_until_finished()
    steps = self.all_steps() if step is None else [step]
    empty = (None, None, None) if with_config else (None, None)
    for s in reversed(steps):
      problem = self._check_files(s)
      if problem is None:
        try:
          items = {"state": ocp.args.StandardRestore(target)}
          if data_iter is not None:
            items["data"] = _grain_checkpoint().CheckpointRestore(data_iter)
          if with_config:
            items["config"] = ocp.args.JsonRestore()
          out = self._mngr.restore(s, args=ocp.args.Composite(**items))
          state = out.state
          jax.block_until_ready(state)
          if with_config:
            return s, state, out.config
          return s, state
        except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
          problem = f"{type(e).__name__}: {str(e)[:300]}"
      msg = (f"Checkpoint step {s} in {self.directory} is corrupt or incomplete ({problem}); "
             f"falling back to the previous step.")
      warnings.warn(msg, RuntimeWarning)
      log.warning(msg)
    if steps:
      raise RuntimeError(f"No restorable checkpoint in {self.directory}: tried steps {steps}.")
    return empty

  def _check_files(self, step: int) -> Optional[str]:
    """Cheap structural check: required files present and non-empty."""
    root = os.path.join(self.directory, str(step), "state")
    if not os.path.isdir(root):
      return f"missing {root}"
    for name in ("_METADATA", "manifest.ocdbt"):
      p = os.path.join(root, name)
      if not os.path.isfile(p):
        return f"missing {p}"
    for dirpath, _, files in os.walk(root):
      for f in files:
        if os.path.getsize(os.path.join(dirpath, f)) == 0:
          return f"empty {os.path.join(dirpath, f)}"
    return None

  # -------------------------------------------------------------- lifecycle
  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
