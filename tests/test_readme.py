"""The README's claims name the tests that back them: every named test must exist."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_test_the_readme_names_exists():
  text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  named, module = [], None
  # `tests/x.py::name` sets the module for the `::other` shorthands that follow it in the same table cell.
  for m in re.finditer(r"`(tests/[\w/]+\.py)(?:::(\w+))?`|`::(\w+)`", text):
    if m.group(1):
      module = m.group(1)
      if m.group(2):
        named.append((module, m.group(2)))
    else:
      assert module is not None, f"README names ::{m.group(3)} before any tests/ module"
      named.append((module, m.group(3)))
  assert len(named) >= 15, "the guarantees table lost its rows"
  missing = []
  for path, name in named:
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full) or not re.search(rf"^def {name}\b", open(full, encoding="utf-8").read(), re.M):
      missing.append(f"{path}::{name}")
  assert not missing, f"README names tests that do not exist: {missing}"
