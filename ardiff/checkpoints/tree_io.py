"""Parameter-tree I/O helpers shared by every on-disk format (params directories, Hugging Face directories).

* :func:`flatten` / :func:`unflatten`: nested dicts <-> ``"/"``-joined keys (``"layers/mlp/up_proj/kernel"``).
* :func:`norm_index` / :func:`fit_sharding`: reading a tensor straight into a ``NamedSharding``, one device slice at
  a time (``jax.make_array_from_callback`` hands each device its index; only that slice is read from disk).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)


def flatten(tree, prefix=()) -> dict:
  """``{"a": {"b": x}} -> {"a/b": x}``."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out["/".join(prefix + (k,))] = v
  return out


def unflatten(flat: Mapping) -> dict:
  """Inverse of :func:`flatten`."""
  tree: dict = {}
  for key, v in flat.items():
    node = tree
    parts = key.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return tree


def norm_index(idx: Sequence[Any], shape: Sequence[int]) -> Tuple[slice, ...]:
  """A device's index (from ``make_array_from_callback``) as one contiguous ``slice`` per dimension of ``shape``."""
  idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
  out = []
  for s, n in zip(idx, shape):
    if not isinstance(s, slice):
      raise TypeError(f"unexpected index {s!r}")
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided index {s!r} is not supported")
    out.append(slice(start, stop))
  return tuple(out)


def fit_sharding(sharding, shape):
  """``sharding`` with every mesh axis that does not divide its dimension dropped (that dim replicated)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh_shape = dict(sharding.mesh.shape)
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  changed = False
  for i, (axes, n) in enumerate(zip(spec, shape)):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh_shape[a] for a in names]))
    if n % size:
      log.warning("dimension %d (size %d) of a %s parameter is not divisible by mesh axes %s (%d); replicating it.",
                  i, n, shape, names, size)
      spec[i] = None
      changed = True
  return NamedSharding(sharding.mesh, P(*spec)) if changed else sharding
