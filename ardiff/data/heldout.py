"""A held-out English text for perplexity: the Gospel of Mark (King James Version), vendored at
``ardiff/data/corpora/kjv_mark.txt`` (82,518 bytes; source, licence and sha256 in ``corpora/README.md``).

Held out in the strong sense: a model trained on the embedded Shakespeare corpus never saw it, and it is English of
a neighbouring period (1611), so its perplexity ratio between families measures how they generalise, not how they
memorise the training plays.

:func:`heldout_batches` cuts the tokenized text into rows of ``seq_len`` tokens, each ``[BOS] + the next seq_len - 1
tokens``, every position a target (segment id 1), ``batch_size`` rows per batch; the last partial batch is dropped so
every family sees the same rows.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

HELDOUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora", "kjv_mark.txt")
HELDOUT_SHA256 = "6bb13b0ed12fe53a7121e4cda73efc50f0009c62da56145dbdcdb334441c8209"
HELDOUT_NAME = "KJV Gospel of Mark"


def read_heldout(path: str = HELDOUT_PATH) -> str:
  """The held-out text, checked against its sha256."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"held-out corpus not found at {path!r}; it ships with ardiff "
                            "(ardiff/data/corpora/kjv_mark.txt) - restore it from git.")
  data = open(path, "rb").read()
  digest = hashlib.sha256(data).hexdigest()
  if digest != HELDOUT_SHA256:
    raise ValueError(f"held-out corpus {path!r} has sha256 {digest}, expected {HELDOUT_SHA256}: it was changed; "
                     "restore it from git (see ardiff/data/corpora/README.md).")
  return data.decode("utf-8")


def heldout_batches(tok, *, seq_len: int, batch_size: int, text: str | None = None) -> list:
  """``[{"tokens", "segment_ids"}]``, each ``int32 [batch_size, seq_len]`` (see the module docstring)."""
  if seq_len < 2 or batch_size < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 2 and batch_size={batch_size} >= 1.")
  ids = np.asarray(tok.encode(read_heldout() if text is None else text), np.int32)
  body = seq_len - 1
  rows = len(ids) // body
  if rows < batch_size:
    raise ValueError(f"the held-out text gives {rows} rows of {seq_len} tokens, fewer than batch_size={batch_size}.")
  tokens = np.concatenate([np.full((rows, 1), tok.bos_id, np.int32), ids[:rows * body].reshape(rows, body)], axis=1)
  out = []
  for start in range(0, rows - batch_size + 1, batch_size):
    chunk = tokens[start:start + batch_size]
    out.append({"tokens": chunk, "segment_ids": np.ones_like(chunk)})
  return out
