"""``--from-hf ORG/NAME``: a model already in the local Hugging Face cache, found offline (nothing is downloaded).

The cache layout (``huggingface_hub``): ``HUB/models--ORG--NAME/refs/<ref>`` holds a commit hash and
``HUB/models--ORG--NAME/snapshots/<commit>/`` the files. ``HUB`` is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``. ``ORG/NAME@REV`` picks a ref (branch, tag)
or a commit (its full hash or a unique prefix); without ``@REV`` the ``main`` ref, else the only snapshot.
"""

from __future__ import annotations

import os
from typing import List

from ardiff.errors import UsageError


def hub_dirs() -> List[str]:
  """The cache directories searched, in order (existing or not)."""
  dirs = []
  if os.environ.get("HF_HUB_CACHE"):
    dirs.append(os.environ["HF_HUB_CACHE"])
  if os.environ.get("HF_HOME"):
    dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  dirs.append(os.path.join(xdg, "huggingface", "hub"))
  return list(dict.fromkeys(os.path.abspath(os.path.expanduser(d)) for d in dirs))


def _looks_like_repo_id(spec: str) -> bool:
  name = spec.split("@", 1)[0]
  parts = name.split("/")
  return (len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))
          and not any(p in (".", "..") for p in parts))


def _snapshot(repo_dir: str, repo_id: str, rev: str) -> str:
  snapshots = os.path.join(repo_dir, "snapshots")
  have = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
  if not have:
    raise UsageError(f"{repo_dir} has no snapshots: the download of {repo_id} did not finish. Download it again "
                     "(e.g. `huggingface-cli download " + repo_id + "`).")
  ref_file = os.path.join(repo_dir, "refs", rev or "main")
  if os.path.isfile(ref_file):
    with open(ref_file) as f:
      commit = f.read().strip()
    if commit in have:
      return os.path.join(snapshots, commit)
  if rev:
    matches = [c for c in have if c.startswith(rev)]
    if len(matches) == 1:
      return os.path.join(snapshots, matches[0])
    refs_dir = os.path.join(repo_dir, "refs")
    refs = sorted(os.listdir(refs_dir)) if os.path.isdir(refs_dir) else []
    raise UsageError(f"revision {rev!r} of {repo_id} is not in the local cache {repo_dir} (snapshots: "
                     f"{', '.join(have)}; refs: {', '.join(refs) or 'none'}).")
  if len(have) == 1:
    return os.path.join(snapshots, have[0])
  raise UsageError(f"{repo_id} has {len(have)} cached snapshots ({', '.join(have)}) and no refs/main; pick one "
                   f"with {repo_id}@COMMIT.")


def resolve_model_dir(spec: str) -> str:
  """A local model directory for ``spec``: an existing directory as is, else ``ORG/NAME[@REV]`` in the local
  Hugging Face cache. Raises :class:`UsageError` naming the directories searched; never downloads."""
  path = os.path.expanduser(os.fspath(spec))
  if os.path.isdir(path):
    return os.path.abspath(path)
  if not _looks_like_repo_id(spec):
    raise UsageError(f"--from-hf {spec}: no such directory (and it is not an ORG/NAME repo id).")
  repo_id, _, rev = spec.partition("@")
  org, name = repo_id.split("/")
  searched = []
  for hub in hub_dirs():
    repo_dir = os.path.join(hub, f"models--{org}--{name}")
    searched.append(repo_dir)
    if os.path.isdir(repo_dir):
      snap = _snapshot(repo_dir, repo_id, rev)
      if not os.path.isfile(os.path.join(snap, "config.json")):
        raise UsageError(f"{snap} (the cached {repo_id}) has no config.json; download the full model.")
      return snap
  raise UsageError(f"--from-hf {spec}: not a directory and not in the local Hugging Face cache (looked in "
                   f"{', '.join(searched)}). ardiff never downloads: fetch it first, e.g. `huggingface-cli download "
                   f"{repo_id}`, or set HF_HOME / HF_HUB_CACHE to the cache that holds it.")
