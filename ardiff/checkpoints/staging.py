"""All-or-nothing output directories for the exporters and the converter.

Every command that writes a directory (``ardiff export``, ``ardiff convert``) writes it through
:func:`staged_output`: files go to a hidden temporary directory beside the destination and are moved into place
only when everything succeeded, so a crash, a bad tensor or Ctrl-C never leaves a half-written checkpoint that a
later ``from_pretrained`` / ``load_run`` would read. A destination that already has files is refused unless
``overwrite`` is set, and even then only when it looks like an earlier export (so ``--out . --overwrite`` cannot
wipe a source tree).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from ardiff.checkpoints.paths import clean_path, is_url

# A directory holding one of these was written by an exporter (HF, params, run, StableHLO) and may be replaced.
EXPORT_MARKERS = ("config.json", "model_config.json", "serving.json")


def _umask() -> int:
  """The process umask (``os.umask`` can only be read by setting it, so it is set straight back)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _make_readable_like_the_rest(root: str) -> None:
  """Gives ``root`` and everything below it the modes a plain ``open()`` / ``os.makedirs`` would (0644 / 0755 under
  the usual umask 022).

  ``mkdtemp`` creates 0700 and some writers (safetensors' ``save_file``) create 0600 files, so without this an
  export would be unreadable by the other users and services (a model server, a shared filesystem) that read the
  run's other outputs.
  """
  mask = _umask()
  file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
  for dirpath, _, filenames in os.walk(root):
    os.chmod(dirpath, dir_mode)
    for name in filenames:
      path = os.path.join(dirpath, name)
      if not os.path.islink(path):
        os.chmod(path, file_mode)


def _entries(out_dir: str):
  """``None`` when ``out_dir`` does not exist, else its entry names; raises when it is a file."""
  from etils import epath
  p = epath.Path(out_dir)
  if not p.exists():
    return None
  if not p.is_dir():
    raise NotADirectoryError(f"output {out_dir} exists and is a file; choose a directory path for --out.")
  return sorted(c.name for c in p.iterdir())


def check_output_dir(out_dir, *, overwrite: bool = False) -> str:
  """Raises before anything is written when ``out_dir`` cannot be (re)written; returns its absolute path."""
  out_dir = clean_path(out_dir)
  entries = _entries(out_dir)
  if entries is not None:
    if entries and not overwrite:
      raise FileExistsError(f"output directory {out_dir} is not empty ({len(entries)} entries, e.g. "
                            f"{entries[:3]}); choose another --out or pass --overwrite (overwrite=True) to "
                            "replace it.")
    if entries and not any(m in entries for m in EXPORT_MARKERS):
      raise FileExistsError(f"refusing to overwrite {out_dir}: it holds {entries[:3]}... but none of "
                            f"{EXPORT_MARKERS}, so it is not an earlier export. Choose an empty or new --out.")
  return out_dir


def _ancestors(path: str) -> list:
  """``path`` and its parents, nearest first."""
  out = []
  while path and path not in out:
    out.append(path)
    path = os.path.dirname(path)
  return out


@contextlib.contextmanager
def staged_output(out_dir, *, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary directory; when the block succeeds it becomes ``out_dir`` (replacing the old one).

  On an exception the temporary directory is deleted and ``out_dir`` is left exactly as it was. A URL ``out_dir``
  (an object store: no atomic directory rename) is staged in a local temporary directory and uploaded after the
  block succeeded, replacing an earlier export there.
  """
  out_dir = check_output_dir(out_dir, overwrite=overwrite)
  if is_url(out_dir):
    with _staged_upload(out_dir) as tmp:
      yield tmp
    return
  parent, name = os.path.split(out_dir)
  missing = [d for d in _ancestors(parent) if not os.path.isdir(d)]
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
  except OSError as e:
    for d in missing:  # the parents this call created, deepest first: nothing is left behind
      if os.path.isdir(d) and not os.listdir(d):
        os.rmdir(d)
    # as an error type the CLI reports in one line (strerror says what really happened: full disk, read-only...)
    kind = type(e) if isinstance(e, (FileNotFoundError, NotADirectoryError)) else PermissionError
    raise kind(f"cannot create the output directory {out_dir} ({e.strerror}: {e.filename}); choose an --out in a "
               "directory you can write to.") from None
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _make_readable_like_the_rest(tmp)
  old = None
  if os.path.isdir(out_dir):  # empty, or an earlier export being overwritten: swap, then delete the old one
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rmdir(old)
    os.replace(out_dir, old)
  os.replace(tmp, out_dir)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _staged_upload(out_dir: str) -> Iterator[str]:
  from etils import epath
  tmp = tempfile.mkdtemp(prefix=".ardiff-export-")
  try:
    yield tmp
    dst = epath.Path(out_dir)
    if dst.exists():
      dst.rmtree()
    for dirpath, _, filenames in os.walk(tmp):
      rel = os.path.relpath(dirpath, tmp)
      target = dst if rel == "." else dst / rel
      target.mkdir(parents=True, exist_ok=True)
      for name in filenames:
        epath.Path(os.path.join(dirpath, name)).copy(target / name)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)

