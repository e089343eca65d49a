"""Orbax CheckpointManager wrapper: train state + grain iterator + JSON config, async, restore on any mesh.

Orbax writes each step into a temporary directory and renames it when complete, so unfinished saves are never
listed as steps. A finalized step can still be damaged afterwards (files deleted/truncated, a disk that filled up);
:func:`restore_latest` -- the one place every reader of a checkpoint directory goes through (train resume,
``load_run`` for eval/sample/export, ``train.init_from``) -- then moves the bad step aside as
``<dir>/<step>.corrupt-<reason>`` (renamed, never deleted; orbax does not list it as a step, so the step can be
saved again), warns once naming the step and the reason, and restores the previous step.

Directories are ``etils.epath`` paths: local paths and URLs (``gs://...``) alike.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, List, Optional, Tuple, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath

from ardiff.checkpoints.paths import as_path

T = TypeVar("T")
# Test hook for fault injection (tests/test_train_e2e.py): "<when>:<step>" with when in before|during|after kills
# this process with SIGKILL before the save of <step> starts, right after its asynchronous write started, or after
# it was committed; "sigterm:<step>" sends it SIGTERM (a preemption) when step <step> is done. A "@<process>" suffix
# limits it to that process index (tests/test_multihost.py).
KILL_ENV = "ARDIFF_TEST_KILL_AT"


class NoCheckpointError(FileNotFoundError):
  """A checkpoint directory holds no restorable step."""


class MissingItemError(ValueError):
  """A sound checkpoint lacks what was asked (e.g. EMA parameters of a run trained without EMA): not damage, so
  :func:`restore_latest` lets it through instead of moving the step aside."""


def _grain_checkpoint():
  import grain  # lazy: only needed when an iterator is checkpointed
  return grain.checkpoint


def step_problem(step_dir: epath.Path, items=("state",)) -> Optional[str]:
  """Cheap structural check of a finalized step before orbax reads it: each item's metadata present and no empty
  file. Returns a short reason, or None when the step looks complete (orbax may still fail on damaged data)."""
  for item in items:
    root = step_dir / item
    if not root.is_dir():
      return f"missing {item}/"
    for name in ("_METADATA", "manifest.ocdbt"):
      if not (root / name).exists():
        return f"missing {item}/{name}"
    for dirpath, _, files in root.walk():
      for name in files:
        if (dirpath / name).stat().length == 0:
          return f"empty {(dirpath / name).relative_to(step_dir)}"
  return None


def _tag(reason: str) -> str:
  """A file-name-safe tag for a reason: its first word ('missing', 'empty', or the exception's class name)."""
  return re.sub(r"[^A-Za-z0-9]+", "-", reason.split(":")[0].split()[0] if reason.strip() else "").strip("-")[:40] \
      or "unreadable"


def quarantine(directory, step: int, reason: str) -> Optional[epath.Path]:
  """Renames ``directory/<step>`` to ``directory/<step>.corrupt-<tag>`` (orbax ignores that name); returns the new
  path, or None when the directory cannot be renamed (a read-only run directory: the step is only skipped)."""
  src = as_path(directory) / str(step)
  base = f"{step}.corrupt-{_tag(reason)}"
  dst = src.parent / base
  n = 1
  while dst.exists():  # the same step went bad twice (retrained, damaged again): keep both copies
    n += 1
    dst = src.parent / f"{base}-{n}"
  try:
    src.rename(dst)
  except OSError:
    return None
  return dst


# The pieces of the traceback that each late tensorstore completion prints (threads interleave them mid-line).
_LOOP_CLOSED_PIECES = re.compile(
    r"Traceback \(most recent call last\):|File \"[^\"]*asyncio[/\\]base_events\.py\", line \d+, in "
    r"(?:call_soon_threadsafe|_check_closed)|self\._check_closed\(\)|raise RuntimeError\('Event loop is closed'\)|"
    r"RuntimeError: Event loop is closed")
# Python prints the last line in parts ("RuntimeError", ": ", the message, "\n"), which other threads can split.
_LOOP_CLOSED_ATOMS = re.compile(r"(?:\s|RuntimeError|:|Event loop is closed)*")


class _LoopNoiseFilter:
  """While active, file descriptor 2 goes through a pipe whose lines are passed on at once, minus the pieces of the
  "RuntimeError: Event loop is closed" tracebacks that orbax/tensorstore print there for a damaged step.

  When one read of a damaged step fails, orbax's event loop closes while tensorstore still completes the step's
  other reads, and each completion prints that traceback straight to fd 2 (not through sys.excepthook); the step is
  handled (moved aside, one warning), so they are noise. Threads interleave the pieces mid-line, so pieces are
  removed wherever they are and lines left blank are dropped; every other byte reaches stderr as it is written.
  """

  def __init__(self):
    self.saved = None
    self.last_write = time.monotonic()

  def __enter__(self):
    try:
      if sys.stderr is not None:
        sys.stderr.flush()
      saved = os.dup(2)
      read_end, write_end = os.pipe()
    except (OSError, ValueError):
      return self  # no stderr to filter: a no-op
    self.saved = saved
    os.dup2(write_end, 2)
    os.close(write_end)
    self.thread = threading.Thread(target=self._pump, args=(read_end,), daemon=True)
    self.thread.start()
    return self

  def _pump(self, read_end: int) -> None:
    pending = b""
    while True:
      chunk = os.read(read_end, 65536)
      if not chunk:
        break
      self.last_write = time.monotonic()
      pending += chunk
      *lines, pending = pending.split(b"\n")
      for line in lines:
        self._emit(line + b"\n")
    if pending:
      self._emit(pending)
    os.close(read_end)

  def _emit(self, data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    cleaned = _LOOP_CLOSED_PIECES.sub("", text)
    if cleaned != text or "Event loop is closed" in text or "RuntimeError" in text:
      if _LOOP_CLOSED_ATOMS.fullmatch(cleaned):  # what is left is whitespace or the message's own parts
        return
      data = cleaned.encode()
    try:
      os.write(self.saved, data)
    except OSError:  # stderr closed under us (the filter timed out and ended): nothing to write to
      pass

  def settle(self, quiet_s: float = 0.5, max_s: float = 10.0) -> None:
    """Waits until nothing was written for ``quiet_s`` (at most ``max_s``): a failed step's other reads finish."""
    start = time.monotonic()
    self.last_write = max(self.last_write, start)
    while time.monotonic() - self.last_write < quiet_s and time.monotonic() - start < max_s:
      time.sleep(0.05)

  def __exit__(self, *exc):
    if self.saved is None:
      return False
    if sys.stderr is not None:
      sys.stderr.flush()
    os.dup2(self.saved, 2)  # the pipe's last write end closes: the pump drains it and stops
    self.thread.join(timeout=5)
    os.close(self.saved)
    return False


def restore_latest(directory, steps: List[int], restore_one: Callable[[int], T]) -> Tuple[int, T]:
  """``(step, restore_one(step))`` for the newest of ``steps`` that restores.

  A step is damaged when it fails the structural check (:func:`step_problem`), or when its restore raises but an
  older step restores with the same target. A damaged step is moved aside with :func:`quarantine`, and one
  warning names it and the reason. When every step raises, nothing is moved (the cause is then most likely the
  target -- another model config -- not the checkpoints) and a ValueError lists each step's error. Raises
  :class:`NoCheckpointError` when no step is left at all.
  """
  directory = as_path(directory)
  failed = []  # (step, problem) of newer steps whose restore raised; damaged if an older one restores
  for s in sorted(steps, reverse=True):
    problem = step_problem(directory / str(s))
    if problem is not None:
      _set_aside(directory, s, problem)
      continue
    try:
      with _LoopNoiseFilter() as noise:
        try:
          out = restore_one(s)
        except Exception:
          noise.settle()  # the step's other reads finish, and print, while the filter is on
          raise
    except MissingItemError:
      raise
    except Exception as e:  # noqa: BLE001 - any failure (orbax, tensorstore, json, shapes) may be damage
      failed.append((s, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))
      continue
    for bad, why in failed:
      _set_aside(directory, bad, why)
    return s, out
  if failed:
    raise ValueError(f"no checkpoint in {directory} could be restored: " + "; ".join(
        f"step {s}: {why}" for s, why in failed) + ". If the model config changed since these were written, use "
        "the run's own config.json; otherwise the checkpoints are damaged (restore a copy or train again).")
  if steps:
    raise NoCheckpointError(f"no restorable checkpoint in {directory}: steps {sorted(steps)} are all damaged and "
                            "were moved aside as <step>.corrupt-*. Train again, or restore a copy.")
  raise NoCheckpointError(f"{directory} holds no finished checkpoint; train (or wait for the first save) first.")


def _set_aside(directory: epath.Path, step: int, problem: str) -> None:
  moved = quarantine(directory, step, problem)
  where = f"moved aside to {moved.name}" if moved is not None else "left in place (directory not writable)"
  msg = (f"checkpoint step {step} in {directory} is corrupt or incomplete ({problem}); {where}; "
         "falling back to the previous step.")
  warnings.warn(msg, RuntimeWarning, stacklevel=3)  # once: not also logged, a CLI user would read it twice


def _maybe_kill(when: str, step: int) -> None:
  spec = os.environ.get(KILL_ENV)
  if spec and "@" in spec:  # "<when>:<step>@<process>": only that process of a multi-process run
    spec, _, process = spec.partition("@")
    if process != str(jax.process_index()):
      return
  if spec and spec == f"{when}:{step}":
    os.kill(os.getpid(), signal.SIGTERM if when == "sigterm" else signal.SIGKILL)


def _is_sharded(data_iter) -> bool:
  return hasattr(data_iter, "num_shards")  # ardiff.data.pipeline.ShardedBatches (no import: no cycle)


def _gather_shard_states(data_iter) -> dict:
  """Every process's shard states in one dict (a collective: every process calls it at the same step)."""
  import json

  from ardiff import distributed
  local = data_iter.get_state()
  parts = [json.loads(p) for p in distributed.gather_strings(json.dumps(local, sort_keys=True))]
  return {"num_shards": local["num_shards"], "shards": distributed.merge_dicts([p["shards"] for p in parts])}


def _single_iterator(data_iter, step):
  """The one grain iterator of a single-shard, single-process run (what a pre-shard checkpoint can restore)."""
  its = getattr(data_iter, "_iters", {})
  if data_iter.num_shards != 1 or len(its) != 1:
    raise MissingItemError(
        f"checkpoint step {step} holds the data iterator of a one-shard run (written before data shards), but "
        f"this run has {data_iter.num_shards} data shards (mesh.data * mesh.fsdp); resume it on one device, or "
        "start a new run_dir with train.init_from=<this run>.")
  return next(iter(its.values()))


class Checkpointer:

  def __init__(self, directory, max_to_keep: int = 3, save_every: int = 1000, async_save: bool = True,
               **kwargs):
    if "async" in kwargs:  # Checkpointer(dir, ..., **{"async": False})
      async_save = kwargs.pop("async")
    if kwargs:
      raise TypeError(f"Unknown Checkpointer arguments: {sorted(kwargs)}.")
    self.directory = as_path(directory)
    # data: grain's own per-process iterator files (one plain iterator); data_shards: the JSON states of every data
    # shard of a multi-process run (ardiff.data.pipeline.ShardedBatches), gathered to process 0 and written once,
    # so any number of processes can restore them
    handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                "data": _grain_checkpoint().CheckpointHandler(), "data_shards": ocp.JsonCheckpointHandler()}
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_every,
                                             enable_async_checkpointing=async_save, create=True),
        item_handlers=handlers)

  # ------------------------------------------------------------------ save
  def save(self, step: int, state: Any, data_iter=None, config_dict: Optional[dict] = None,
           force: bool = False) -> bool:
    """Save ``state`` (plain arrays), optionally the grain iterator and a JSON config; returns whether it saved."""
    _maybe_kill("sigterm", step)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None and _is_sharded(data_iter):
      if not (force or self._mngr.should_save(int(step))):
        return False  # the gather below is a collective: only on steps that are saved (same on every process)
      items["data_shards"] = ocp.args.JsonSave(_gather_shard_states(data_iter))
    elif data_iter is not None:
      items["data"] = _grain_checkpoint().CheckpointSave(data_iter)
    if config_dict is not None:
      items["config"] = ocp.args.JsonSave(config_dict)
    _maybe_kill("before", step)
    saved = self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)
    if saved:
      _maybe_kill("during", step)
      if os.environ.get(KILL_ENV) == f"after:{step}":
        self._mngr.wait_until_finished()
        _maybe_kill("after", step)
    return saved

  # --------------------------------------------------------------- restore
  def all_steps(self):
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def restore(self, target: Any, data_iter=None, step: Optional[int] = None, with_config: bool = False):
    """Restore the latest (or given) step onto the shardings carried by ``target`` (ShapeDtypeStructs).

    Returns ``(step, state)`` or ``(step, state, config_dict)`` with ``with_config``; ``(None, None[, None])``
    if there is no checkpoint. ``data_iter`` is restored in place. A step that fails to restore is moved aside
    with a warning and the previous one is tried (:func:`restore_latest`); none left raises NoCheckpointError.
    """
    self._mngr.wait_until_finished()
    steps = self.all_steps() if step is None else [step]
    if not steps:
      return (None, None, None) if with_config else (None, None)

    def restore_one(s):
      items = {"state": ocp.args.StandardRestore(target)}
      if data_iter is not None and _is_sharded(data_iter):
        if (self.directory / str(s) / "data_shards").exists():
          items["data_shards"] = ocp.args.JsonRestore()
        else:  # written before data shards existed: grain's per-process files of one plain iterator
          items["data"] = _grain_checkpoint().CheckpointRestore(_single_iterator(data_iter, s))
      elif data_iter is not None:
        items["data"] = _grain_checkpoint().CheckpointRestore(data_iter)
      if with_config:
        items["config"] = ocp.args.JsonRestore()
      out = self._mngr.restore(s, args=ocp.args.Composite(**items))
      jax.block_until_ready(out.state)  # surface tensorstore read errors here, inside the fallback
      return out

    try:
      s, out = restore_latest(self.directory, steps, restore_one)
    finally:
      self._mngr.reload()  # forget the steps moved aside, so that they can be saved again
    if data_iter is not None and _is_sharded(data_iter) and "data_shards" in out:
      data_iter.set_state(out.data_shards)  # after the fallback: another shard count is a refusal, not damage
    return (s, out.state, out.config) if with_config else (s, out.state)

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
