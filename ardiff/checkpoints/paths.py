"""Paths of everything ardiff reads and writes: local paths and URLs (``gs://bucket/run``) alike.

Local paths are expanded (``~``) and made absolute; a URL is kept exactly as given (``os.path.abspath`` would turn
``gs://bucket/x`` into ``./gs:/bucket/x``). ``etils.epath`` (which orbax and TFDS use too) reads and writes both.
"""

from __future__ import annotations

import os

from etils import epath


def is_url(path) -> bool:
  return "://" in os.fspath(path)


def clean_path(path) -> str:
  """A local path expanded and made absolute; a URL exactly as given."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def as_path(path) -> epath.Path:
  """:func:`clean_path` as an ``epath.Path``."""
  return epath.Path(clean_path(path))
