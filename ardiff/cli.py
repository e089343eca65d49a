"""Command dispatch for ``python -m ardiff``. Each command lives in its own module and takes ``argv``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("ardiff.training.main", "train a model (default: byte-level block diffusion on Shakespeare)"),
    "eval": ("ardiff.training.evaluate", "evaluate a checkpoint: loss, NELBO/perplexity, bits per byte"),
    "sample": ("ardiff.sampling.main", "generate text from a checkpoint"),
    "compile": ("ardiff.training.aot", "AOT-compile the sharded train step for a TPU topology"),
    "export": ("ardiff.export.main", "export a run: Hugging Face directory, portable params, StableHLO"),
    "convert": ("ardiff.export.convert", "convert an AR model (HF directory or run) into a block-diffusion run"),
}

USAGE = "usage: python -m ardiff <command> [flags]\n\ncommands:\n" + "\n".join(
    f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())


def main(argv) -> int:
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  name = argv[1]
  if name not in COMMANDS:
    print(f"unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
    return 2
  module_name = COMMANDS[name][0]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      print(f"`ardiff {name}` is not available in this version ({module_name} is missing).", file=sys.stderr)
      return 2
    raise
  return module.main([f"ardiff {name}"] + list(argv[2:])) or 0
