"""The repository stands alone: nothing it ships points outside it, and the section pointers into
docs/algorithms.md (``docs/algorithms.md §3.2``) name sections that exist."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Built from pieces so that this file does not match itself.
OUTSIDE = ("../" + "shared", "shared" + "/notes", "anchors" + ".md", "jax_stack" + ".md", "tpu_static_cost" + ".md")
OUTSIDE_SECTION = re.compile("anchors" + r"\s*§", re.I)  # a section of that notes file (the word, then a section sign)
POINTER = re.compile(r"docs/algorithms\.md`*((?:[\s,;]*§\d+(?:\.\d+)?(?:[–-]\d+(?:\.\d+)?)?)+)")


def _shipped_text_files():
  """{path: text} of the tracked files (every file when this is not a git checkout), binaries skipped."""
  try:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    paths = [p for p in out.decode().split("\0") if p]
  except (OSError, subprocess.CalledProcessError):
    paths = [os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, files in os.walk(ROOT) for f in files
             if ".git" not in d.split(os.sep)]
  texts = {}
  for rel in paths:
    path = os.path.join(ROOT, rel)
    if not os.path.isfile(path):  # deleted in the working tree
      continue
    with open(path, "rb") as f:
      data = f.read()
    if b"\0" in data:
      continue
    try:
      texts[rel] = data.decode("utf-8")
    except UnicodeDecodeError:
      continue
  return texts


def test_no_file_points_outside_the_repository():
  texts = _shipped_text_files()
  assert "ardiff/masks.py" in texts and "docs/algorithms.md" in texts  # the scan sees the repository
  hits = [f"{rel}:{i}: {line.strip()}" for rel, text in texts.items() for i, line in enumerate(text.splitlines(), 1)
          if any(s in line for s in OUTSIDE) or OUTSIDE_SECTION.search(line)]
  assert not hits, "pointers outside the repository (move what they need into docs/):\n" + "\n".join(hits)


def test_algorithms_pointers_name_existing_sections():
  texts = _shipped_text_files()
  doc = texts["docs/algorithms.md"]
  sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", doc, flags=re.M))
  assert {"1", "2", "3", "3.2", "4", "5", "6"} <= sections
  bad, seen = [], 0
  for rel, text in texts.items():
    for m in POINTER.finditer(text):
      for ref in re.findall(r"\d+(?:\.\d+)?", m.group(1)):
        seen += 1
        if ref not in sections:
          bad.append(f"{rel}: {m.group(0)!r} -> no section {ref}")
  assert seen >= 10, f"only {seen} pointers found: the pattern no longer matches how the code cites the doc"
  assert not bad, "\n".join(bad)
