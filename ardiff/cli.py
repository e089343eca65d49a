"""Command dispatch for ``python -m ardiff``. Each command lives in its own module and takes ``argv``.

Errors: :func:`main` is the one place that turns an *expected* error into one paragraph, ``error: <message>`` on
stderr, and exit status 2. Expected means a mistake the user can fix, and the library raises it with a message
naming the value and the fix:

* ``ValueError`` (bad config or flag value, corrupt input such as a truncated ``config.json``; this includes
  :class:`ardiff.errors.UsageError`), ``NotImplementedError`` (a feature this version does not have);
* ``FileNotFoundError``, ``FileExistsError`` (refused overwrite), ``NotADirectoryError``, ``IsADirectoryError``,
  ``PermissionError`` (missing run directory, unwritable output).

Everything else (``TypeError``, ``KeyError``, ``RuntimeError``...) is a bug and keeps its traceback. ``--debug``
anywhere on the command line, or ``ARDIFF_DEBUG=1``, re-raises expected errors too, with the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "train": ("ardiff.training.main", "train a model (default: block diffusion, BD3-LM B=4, on Shakespeare)"),
    "eval": ("ardiff.training.evaluate", "evaluate a checkpoint: loss, NELBO/perplexity, bits per byte"),
    "sample": ("ardiff.sampling.main", "generate text from a checkpoint"),
    "compile": ("ardiff.training.aot", "AOT-compile the sharded train step for a TPU topology"),
    "export": ("ardiff.export.main", "export a run: Hugging Face directory, portable params, StableHLO"),
    "convert": ("ardiff.export.convert", "convert an AR model (HF directory or run) into a block-diffusion run"),
    "data": ("ardiff.data.main", "your own corpus: prepare a dataset, train a tokenizer, show packed batches"),
    "images": ("ardiff.images.prepare", "image data: write Fashion-MNIST as a TFDS array_record dataset"),
}

USAGE = ("usage: python -m ardiff <command> [flags]    (python -m ardiff <command> --help for its flags)\n\n"
         "commands:\n" + "\n".join(f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())
         + "\n\nflags of every command:\n  --debug   show the traceback of an error (or set ARDIFF_DEBUG=1)")

EXPECTED_ERRORS = (ValueError, NotImplementedError, FileNotFoundError, FileExistsError, NotADirectoryError,
                   IsADirectoryError, PermissionError)
EXIT_USAGE = 2
# Commands that run as one job over several processes when a launcher sets ardiff.distributed's variables.
DISTRIBUTED_COMMANDS = ("train", "eval", "sample")
# Commands that run compiled steps over and over: on a CPU backend they keep freed host pages for the next step.
HOST_MEMORY_COMMANDS = ("train", "eval", "sample")


def debug_requested(argv) -> bool:
  return "--debug" in argv or os.environ.get("ARDIFF_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def format_error(e: BaseException) -> str:
  """One paragraph: the message with its line breaks folded (OSError's ``[Errno 2] ...`` form kept)."""
  return "error: " + (" ".join(str(e).split()) or type(e).__name__)


def main(argv) -> int:
  argv = list(argv)
  debug = debug_requested(argv)
  argv = [a for a in argv if a != "--debug"]
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  name = argv[1]
  if name not in COMMANDS:
    print(f"error: unknown command {name!r}; use one of {', '.join(COMMANDS)}.\n\n{USAGE}", file=sys.stderr)
    return EXIT_USAGE
  module_name = COMMANDS[name][0]
  if name == "compile" and any(a.split("=")[0] in ("--from_hf", "--from-hf") for a in argv[2:]):
    module_name = "ardiff.export.hf_compile"  # an imported checkpoint's sampler steps (config.json only)
  if name in HOST_MEMORY_COMMANDS:  # before importing jax, whose import starts a thread (ardiff.host_memory says why)
    from ardiff import host_memory
    host_memory.keep_freed_memory()
  module = importlib.import_module(module_name)  # lazy: `ardiff sample` need not import the trainer
  try:
    if name in DISTRIBUTED_COMMANDS:  # several processes (launch/local.sh --processes, a TPU pod): join them first
      from ardiff import distributed
      distributed.initialize_from_env()
    return module.main([f"ardiff {name}"] + argv[2:]) or 0
  except SystemExit as e:  # argparse: --help (0) or a usage error it already printed (2)
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    print(f"error: {e.code}", file=sys.stderr)
    return EXIT_USAGE
  except EXPECTED_ERRORS as e:
    if debug:
      raise
    print(format_error(e), file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    if debug:
      raise
    print("error: interrupted.", file=sys.stderr)
    return 130
