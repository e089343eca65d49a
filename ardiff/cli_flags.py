"""Command lines of the config-driven commands (``train``, ``compile``): ``--config FILE[:ARG]``, overrides
``--config.section.key=value`` and a few plain flags, with ``--help``.

Parsed here rather than by absl/ml_collections flags so that ``--help`` prints usage, an unknown override key gets
the project's did-you-mean message (:func:`ardiff.config.unknown_keys_error`) and a value of the wrong type names
the key, the value and the type it needs. Every mistake raises :class:`ardiff.errors.UsageError`.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import os
import traceback
from typing import Any, Callable, Optional

import ml_collections

from ardiff.config import unknown_keys_error
from ardiff.errors import UsageError

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")
_TRUE, _FALSE = ("1", "true", "t", "yes", "y", "on"), ("0", "false", "f", "no", "n", "off")


@dataclasses.dataclass(frozen=True)
class Flag:
  """A plain flag: ``--name=value`` / ``--name value``; ``parse`` turns the string into the value."""

  name: str
  default: Any
  help: str
  parse: Callable[[str], Any] = str


def parse_bool(text: str) -> bool:
  if text.lower() in _TRUE:
    return True
  if text.lower() in _FALSE:
    return False
  raise UsageError(f"expected a boolean (true/false), got {text!r}.")


def usage(prog: str, description: str, default_config: str, flags: tuple) -> str:
  """The ``--help`` text: the flags, and how to override config keys."""
  lines = [f"usage: {prog} [--config FILE[:ARG]] [--config.SECTION.KEY=VALUE ...]"
           + "".join(f" [--{f.name}=...]" for f in flags), "", description.strip(), "", "flags:",
           f"  --config FILE[:ARG]   experiment config file (configs/*.py; default {default_config}); ARG is "
           "passed to its get_config();",
           "                        FILE is looked up in the current directory, then among the configs installed "
           "with ardiff",
           "  --config.SECTION.KEY=VALUE",
           "                        override one config value, e.g. --config.train.num_steps=2000 "
           "--config.model.num_layers=6;",
           "                        sections: model, objective, data, mesh, optimizer, train (and name)"]
  for f in flags:
    kind = "bool: --name / --noname / --name=false" if f.parse is parse_bool else f"default {f.default!r}"
    lines.append(f"  --{f.name:<19} {f.help} ({kind})")
  lines += ["  --debug               show the traceback of an error", "  -h, --help            show this message"]
  return "\n".join(lines)


def _split(argv, flags: tuple):
  """``(config_path, [(key, text)], {flag: text}, wants_help)`` from ``argv[1:]`` (no values parsed yet)."""
  names = {f.name: f for f in flags}
  bools = {f.name for f in flags if f.parse is parse_bool}
  config_path, overrides, values = None, [], {}
  args = list(argv[1:])
  i = 0
  while i < len(args):
    arg = args[i]
    i += 1
    if arg in HELP_FLAGS:
      return config_path, overrides, values, True
    if not arg.startswith("-") or arg in ("-", "--"):
      raise UsageError(f"unexpected argument {arg!r}: flags take the form --name=value (see --help).")
    name, eq, text = arg.lstrip("-").partition("=")
    if name in bools and not eq:
      values[name] = "true"
      continue
    if name.startswith("no") and name[2:] in bools and not eq:
      values[name[2:]] = "false"
      continue
    if name != "config" and not name.startswith("config.") and name not in names:
      known = ["--config", "--config.SECTION.KEY"] + [f"--{n}" for n in names]
      raise UsageError(f"unknown flag {arg!r}; known flags: {', '.join(known)} (see --help).")
    if not eq:
      if i >= len(args):
        raise UsageError(f"flag --{name} needs a value: --{name}=VALUE.")
      text = args[i]
      i += 1
    if name == "config":
      config_path = text
    elif name.startswith("config."):
      overrides.append((name[len("config."):], text))
    else:
      values[name] = text
  return config_path, overrides, values, False


# The experiment files shipped with ardiff: the ``configs`` package next to the ``ardiff`` package (the repository's
# configs/, or site-packages/configs in an install).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def available_configs() -> list:
  """``configs/NAME.py`` of every shipped experiment file."""
  if not os.path.isdir(CONFIGS_DIR):
    return []
  return sorted(f"configs/{n}" for n in os.listdir(CONFIGS_DIR) if n.endswith(".py") and n != "__init__.py")


def resolve_config_path(path: str) -> Optional[str]:
  """The file ``path`` names: relative to the cwd (or absolute) first, then in the shipped ``configs`` package
  (``configs/x.py`` or ``x.py``), so ``--config configs/x.py`` works from any directory. None if neither exists."""
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    return path
  if os.path.isabs(path):
    return None
  rel = os.path.normpath(path)
  rel = rel[len("configs" + os.sep):] if rel.startswith("configs" + os.sep) else rel
  shipped = os.path.join(CONFIGS_DIR, rel)
  return shipped if os.path.isfile(shipped) else None


def _split_config_arg(spec: str):
  """``FILE[:ARG]`` -> ``(path, ARG or None)``; FILE is the longest prefix that resolves to an existing file."""
  path = resolve_config_path(spec)
  if path is not None:
    return path, None
  for i in range(len(spec) - 1, 0, -1):
    if spec[i] == ":":
      path = resolve_config_path(spec[:i])
      if path is not None:
        return path, spec[i + 1:]
  shipped = available_configs()
  raise UsageError(f"--config={spec}: no such config file (looked in {os.getcwd()} and in {CONFIGS_DIR}); pass an "
                   "existing file, optionally FILE:ARG with ARG going to its get_config"
                   + (f". Shipped configs: {', '.join(shipped)}." if shipped else "."))


@contextlib.contextmanager
def _config_file_errors(spec: str, path: str):
  """A config file that does not run is the user's to fix: its error as one UsageError naming the file and line
  (the traceback stays chained for --debug). ValueError and OSError (a config's own checks, e.g. a missing
  directory it reads) pass through as they are."""
  try:
    yield
  except SyntaxError as e:
    raise UsageError(f"--config={spec}: {e.filename or path}, line {e.lineno}: {e.msg}; fix the config file.") from e
  except (ValueError, OSError, UsageError):  # the config's own checks (e.g. a missing from=DIR): already clear
    raise
  except Exception as e:  # noqa: BLE001 - any error raised by the user's config code
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) ==
             os.path.abspath(path)]
    where = f", line {lines[-1]}" if lines else ""
    raise UsageError(f"--config={spec}: running {path}{where} raised {type(e).__name__}: {e}; fix the config file "
                     "(--debug shows the traceback).") from e


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``get_config()`` (or ``get_config(ARG)`` for ``FILE:ARG``) of a config file.

  Loaded here, not by ml_collections' config flags: those read ``sys.argv`` for ``--config.*`` overrides by
  themselves and fail on an unknown key with a bare ``AttributeError``.
  """
  path, arg = _split_config_arg(spec)
  name = "ardiff_config_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None or module_spec.loader is None:
    raise UsageError(f"--config={spec}: {path} is not a Python config file (configs/*.py).")
  module = importlib.util.module_from_spec(module_spec)
  with _config_file_errors(spec, path):
    module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UsageError(f"--config={spec}: {path} defines no get_config(); a config file returns its ConfigDict from "
                     "get_config().")
  with _config_file_errors(spec, path):
    config = module.get_config() if arg is None else module.get_config(arg)
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(f"--config={spec}: get_config() returned {type(config).__name__}, not a ConfigDict.")
  return config


def _convert(key: str, text: str, current):
  """``text`` as the type of the current value of config key ``key``."""
  def fail(kind):
    article = "an" if kind[0] in "aeiou" else "a"
    return UsageError(f"--config.{key}={text!r} is not {article} {kind} (the current value is {current!r}); "
                      f"give {article} {kind}, e.g. --config.{key}={current!r}.")
  if isinstance(current, bool):
    try:
      return parse_bool(text)
    except UsageError:
      raise fail("boolean") from None
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise fail("integer") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise fail("number") from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise fail("tuple literal") from None
    if not isinstance(value, (tuple, list)):
      raise fail("tuple literal")
    return type(current)(value)
  try:  # a None field (e.g. model.mask_token_id): a Python literal, else the text itself
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets ``config.<key>`` (dotted) from its command-line text; unknown keys get a did-you-mean message."""
  parts = key.split(".")
  node, where = config, "the config"
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      raise UsageError(f"--config.{key}: config.{'.'.join(parts[:depth])} is a value ({node!r}), not a section.")
    if part not in node:
      raise UsageError(str(unknown_keys_error(where, {part}, list(node.keys()))).replace(
          "Unknown key(s)", f"--config.{key}: unknown key"))
    if depth < len(parts) - 1:
      node, where = node[part], f"config.{'.'.join(parts[:depth + 1])}"
  current = node[parts[-1]]
  if isinstance(current, ml_collections.ConfigDict):
    raise UsageError(f"--config.{key} is a section; override one of its keys: "
                     f"{', '.join(f'--config.{key}.{k}' for k in sorted(current.keys()))}.")
  value = _convert(key, text, current)
  try:
    with node.unlocked():
      node[parts[-1]] = value
  except (TypeError, ValueError) as e:
    raise UsageError(f"--config.{key}={text!r}: {e}") from e


def parse(argv, *, description: str, default_config: str, flags: tuple = ()) -> Optional[tuple]:
  """``(config, {flag: value})`` of a command line, or None after printing ``--help``."""
  prog = argv[0] if argv else "ardiff"
  config_path, overrides, texts, wants_help = _split(argv, flags)
  if wants_help:
    print(usage(prog, description, default_config, flags))
    return None
  values = {}
  for f in flags:  # plain flags first: a bad one (e.g. a malformed --topology) fails before any loading
    if f.name in texts:
      try:
        values[f.name] = f.parse(texts[f.name])
      except UsageError as e:
        raise UsageError(f"--{f.name}: {e}") from e
      except (TypeError, ValueError) as e:
        raise UsageError(f"--{f.name}={texts[f.name]!r}: {e}") from e
    else:
      values[f.name] = f.default
  config = load_config_file(config_path or default_config)
  for key, text in overrides:
    apply_override(config, key, text)
  config.lock()  # as ml_collections' config flags leave it: no new keys from here on
  return config, values
