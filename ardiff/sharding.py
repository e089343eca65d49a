"""Meshes, logical->mesh axis rules and sharded parameter init (Flax Linen logical partitioning).

Mesh axes are ``("data", "fsdp", "tensor")`` with ``AxisType.Auto`` (GSPMD propagation; the Explicit default of
``jax.make_mesh`` breaks linen's logical constraints).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ardiff import masks as masks_lib

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(data: Any = -1, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence[Any]] = None):
  """A ``(data, fsdp, tensor)`` mesh; at most one axis may be -1 and is filled from the device count.

  ``make_mesh(exp)`` (an :class:`ardiff.experiment.Experiment`) or ``make_mesh(exp.mesh)`` (a
  :class:`ardiff.sections.MeshConfig`) takes the three sizes from the experiment's ``mesh`` section.
  """
  if not isinstance(data, int):
    section = getattr(data, "mesh", data)
    data, fsdp, tensor = (getattr(section, a) for a in MESH_AXES)
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  fill = [k for k, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {sizes}.")
  for k, v in sizes.items():
    if v != -1 and (not isinstance(v, int) or v < 1):
      raise ValueError(f"mesh axis {k}={v!r} must be a positive integer or -1.")
  known = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if n % known:
      raise ValueError(f"Mesh {sizes}: the fixed axes multiply to {known}, which does not divide the {n} "
                       f"available devices, so {fill[0]}=-1 cannot be filled.")
    sizes[fill[0]] = n // known
  total = math.prod(sizes.values())
  if total > n or n % total:
    raise ValueError(f"Mesh {sizes} needs {total} devices, which does not divide the {n} available devices.")
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:total])
  except NotImplementedError as e:
    # e.g. tensor=4 on a v5p 8x8x8 torus: no product of whole physical axes is 4. Splitting a physical axis is
    # legal, only less ICI-friendly, so allow it and say so.
    from jax.experimental import mesh_utils
    logging.warning("mesh %s does not map onto whole physical axes (%s); splitting physical axes.", sizes, e)
    grid = mesh_utils.create_device_mesh(shape, devices[:total], allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def strip_boxes(tree):
  """LogicallyPartitioned boxes -> raw leaves, without applying sharding constraints."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def _init_fn(model, example_tokens):
  def init(rng):
    return model.init(rng, example_tokens, mask=masks_lib.Causal())["params"]
  return init


def abstract_params_and_shardings(model, mesh, rules=DEFAULT_RULES, example_tokens=None):
  """(abstract params as ShapeDtypeStructs, matching NamedSharding tree); no FLOPs."""
  if example_tokens is None:
    example_tokens = jnp.zeros((1, 8), jnp.int32)
  with nn.logical_axis_rules(rules):  # no global mesh: see init_sharded_params
    abstract = jax.eval_shape(_init_fn(model, example_tokens), jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  return strip_boxes(abstract), shardings


def init_sharded_params(model, mesh, rng, rules=DEFAULT_RULES, example_tokens=None):
  """Parameters initialised directly into their shardings (never materialised on one device)."""
  if example_tokens is None:
    example_tokens = jnp.zeros((1, 8), jnp.int32)
  _, shardings = abstract_params_and_shardings(model, mesh, rules, example_tokens)
  init = _init_fn(model, example_tokens)
  # No global mesh here: flax applies sharding constraints to boxed params while DenseGeneral still holds them
  # flattened (rank mismatch error); the out_shardings place the result.
  with nn.logical_axis_rules(rules):
    return jax.jit(lambda r: strip_boxes(init(r)), out_shardings=shardings)(rng)


def with_shardings(abstract, shardings):
  """ShapeDtypeStruct tree carrying shardings (restore targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dim over ``("data", "fsdp")``; the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


# ardiff/model.py's logical parameter axes and the model dimension each one has.
MODEL_DIMS = (("embed", "embed_dim"), ("mlp", "mlp_dim"), ("heads", "num_heads"), ("kv_heads", "num_kv_heads"),
              ("vocab", "vocab_size"))


def check_divisibility(model_cfg, mesh_sizes, rules=DEFAULT_RULES) -> None:
  """A clear ValueError unless every model dimension splits evenly over the mesh axes that ``rules`` map its
  logical axis to (jax refuses uneven shardings, with an IndivisibleError from deep inside jit).

  ``mesh_sizes``: ``{"data": d, "fsdp": f, "tensor": t}`` (``dict(mesh.shape)``)."""
  rule = dict(rules)
  errors = []
  for logical, field in MODEL_DIMS:
    axes = rule.get(logical)
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    value = getattr(model_cfg, field)
    if value % math.prod(mesh_sizes.get(a, 1) for a in axes):
      split = "*".join(f"mesh.{a}={mesh_sizes.get(a, 1)}" for a in axes)
      errors.append(f"model.{field}={value} is not divisible by {split}")
  if errors:
    raise ValueError("; ".join(errors) + ". Change the mesh shape or the model sizes.")


def replicated_fraction(params) -> float:
  """Fraction of parameter bytes that are fully replicated (every device holds the whole array)."""
  total = repl = 0
  for x in jax.tree.leaves(params):
    nbytes = x.size * x.dtype.itemsize
    total += nbytes
    sh = getattr(x, "sharding", None)
    if sh is None or sh.is_fully_replicated:
      repl += nbytes
  return repl / max(total, 1)


def assert_params_sufficiently_sharded(params, mesh, min_fraction: float = 0.5) -> None:
  """Fail loudly if less than ``min_fraction`` of parameter bytes are sharded on a mesh with fsdp/tensor > 1."""
  shape = dict(mesh.shape)
  if shape.get("fsdp", 1) * shape.get("tensor", 1) <= 1:
    return
  sharded = 1.0 - replicated_fraction(params)
  if sharded < min_fraction:
    raise AssertionError(
        f"Only {sharded:.1%} of parameter bytes are sharded on mesh {shape} (need >= {min_fraction:.0%}). "
        "Parameters are probably replicated: check the logical axis rules and that params were created with "
        "init_sharded_params / restored onto sharded targets.")


@contextlib.contextmanager
def activation_sharding(mesh, rules=DEFAULT_RULES):
  """Mesh + logical rules in scope, so the model's activation constraints apply when a function is traced."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def under_mesh(fn, mesh, rules=DEFAULT_RULES):
  """``fn`` called (and therefore traced) inside :func:`activation_sharding`."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with activation_sharding(mesh, rules):
      return fn(*args, **kwargs)
  return wrapped
