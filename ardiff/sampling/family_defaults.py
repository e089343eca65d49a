"""The decoding defaults a run records for ``ardiff sample``: an imported diffusion family (SDAR, Fast-dLLM v2,
Dream, LLaDA; :mod:`ardiff.export.families`) keeps them in its run directory's ``conversion.json`` under
``"decoding"``, so the run samples the family's way with no flags. A flag given on the command line wins.
"""

from __future__ import annotations

import json

from ardiff.checkpoints.paths import as_path

CONVERSION_FILE = "conversion.json"
# What `ardiff sample` uses when neither a flag nor the run says otherwise.
BUILTIN = {"strategy": "threshold", "threshold": 0.9, "temperature": 1.0, "top_p": 0.9}
FILLED = ("strategy", "threshold", "temperature", "top_p", "steps_per_block", "sub_block_size", "block_size")


def read_decoding(run_dir) -> dict:
  """The run's recorded decoding defaults (``{}`` for a trained run or a params directory)."""
  path = as_path(run_dir) / CONVERSION_FILE
  if not path.exists():
    return {}
  try:
    record = json.loads(path.read_text())
  except ValueError:
    return {}  # a damaged provenance file does not block sampling; the built-in defaults apply
  decoding = record.get("decoding") if isinstance(record, dict) else None
  return dict(decoding) if isinstance(decoding, dict) else {}


def fill(args, decoding: dict) -> None:
  """Sets every ``FILLED`` attribute of ``args`` that is None: the run's default, else the built-in one."""
  for name in FILLED:
    if getattr(args, name) is None:
      setattr(args, name, decoding.get(name, BUILTIN.get(name)))


def num_tokens(args, decoding: dict, room: int):
  """``--num_tokens``, else the family's default answer length capped to the context, else None (fill it)."""
  if args.num_tokens is not None or "num_tokens" not in decoding:
    return args.num_tokens
  return max(1, min(int(decoding["num_tokens"]), room))
