"""Attention routing: ``impl = xla | pallas | auto`` and the sharded call of the Pallas kernels.

Shapes: ``q`` is ``[batch, q_len, heads, head_dim]``; ``k`` and ``v`` are
``[batch, kv_len, kv_heads, head_dim]`` with ``kv_heads`` dividing ``heads`` (GQA). The semantics (static mask,
packing, cache validity; empty rows give zeros) are those of :func:`kernels_pallas.reference.reference_attention`,
the dense oracle every path is tested against.

XLA routing (``impl="xla"``, and ``"auto"`` on CPU): :func:`ardiff.attention_xla.xla_attention` computes only the
non-empty tiles of the static mask (cuDNN flash attention for fp16/bf16 on GPU; the dense reference for cached
forwards).

Pallas routing
--------------
* ``kv_lengths`` given (a cached forward: AR token, diffusion block, speculative draft, TiDAR rows) →
  :func:`kernels_pallas.decode_attention.decode_attention`;
* otherwise (training / full-sequence forward) → :func:`kernels_pallas.block_sparse_attention.block_sparse_attention`.

The backend is ``jax.default_backend()``: ``"tpu"`` and ``"gpu"`` run the compiled kernels; on ``"cpu"`` this
raises (nothing falls back to XLA silently). To run the kernels on a CPU host (tests) use the Pallas interpreter,
for one call (``pallas_attention(..., backend="tpu", interpret=True)``) or for everything in a block, including
the model's calls (``with interpret_mode(backend="tpu"):``; ``"tpu"`` interprets the Mosaic kernels faithfully
but slowly, ``"gpu"`` the Triton kernels quickly). ``with target_backend("tpu"):`` makes the *compiled* kernels of
that backend the choice whatever the running backend (AOT compiles for a TPU slice from a CPU host).

Tiles: the block-sparse kernel's TPU tiles are chosen per TPU generation, head dim, mask and lengths from the
measured table of :mod:`kernels_pallas.tile_table`. The generation is the one named by
``target_backend("tpu", generation=...)``, else the one of the devices compiled for
(:func:`kernels_pallas.tile_table.detect_generation`: the ``jax.set_mesh`` mesh's devices, which an AOT compile
for a TPU slice traces under); it is resolved outside the ``shard_map`` and passed to the kernel.

Sharding
--------
Mosaic/Triton calls cannot be partitioned automatically, so under an abstract mesh with more than one device
(``jax.set_mesh``, e.g. :func:`ardiff.sharding.activation_sharding`) the kernel call is wrapped in
``jax.shard_map``. Its specs come from the logical axis rules in scope (``nn.logical_axis_rules``; the defaults of
:mod:`ardiff.sharding` when none are) applied to the names the model gives its activations, :data:`Q_AXES` and
:data:`KV_AXES`, so the kernel sees exactly the blocks the model's sharding constraints produce: each device runs
the kernel on its own batch rows and heads, with no communication.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ardiff import attention_xla
from ardiff import masks as masks_lib
from ardiff import sharding as sharding_lib
from kernels_pallas import block_sparse_attention as block_sparse_lib
from kernels_pallas import decode_attention as decode_lib
from kernels_pallas import tile_table
from kernels_pallas.common import BACKENDS
from kernels_pallas.reference import allowed_bqk, reference_attention  # noqa: F401 - re-exported: the test oracle

IMPLS = ("xla", "pallas", "auto")
Q_AXES = ("batch", "length", "heads", "head_dim")      # logical names of q and the output (ardiff.model)
KV_AXES = ("batch", "length", "kv_heads", "head_dim")  # logical names of k and v (ardiff.model)

_INTERPRET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("ardiff_pallas_interpret", default=None)
_TARGET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("ardiff_pallas_target", default=None)
_GENERATION: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("ardiff_tpu_generation", default=None)


def resolve_impl(impl: str) -> str:
  """'auto' → 'pallas' on TPU/GPU, 'xla' on CPU. Unknown names raise."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of {IMPLS}.")
  if impl == "auto":
    return "pallas" if jax.default_backend() in BACKENDS else "xla"
  return impl


def attention(q, k, v, *, mask: masks_lib.Mask, impl: str = "xla", q_offsets=None,
              q_segment_ids=None, kv_segment_ids=None, kv_lengths=None, sm_scale=None,
              logit_soft_cap=None) -> jax.Array:
  """Masked attention through the implementation named by ``impl`` (see :func:`resolve_impl`).

  Nothing falls back silently: a combination the kernels do not support raises with the reason.
  """
  impl = resolve_impl(impl)
  kwargs = dict(mask=mask, q_offsets=q_offsets, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                kv_lengths=kv_lengths, sm_scale=sm_scale, logit_soft_cap=logit_soft_cap)
  if impl == "xla":
    return attention_xla.xla_attention(q, k, v, **kwargs)
  return pallas_attention(q, k, v, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Backend choice.


@contextlib.contextmanager
def _override(var: contextvars.ContextVar, backend: str, what: str):
  if backend not in BACKENDS:
    raise ValueError(f"{what} must be one of {BACKENDS}, got {backend!r}.")
  token = var.set(backend)
  try:
    yield
  finally:
    var.reset(token)


def interpret_mode(backend: str = "tpu"):
  """Within the block, :func:`pallas_attention` runs ``backend``'s kernels in the Pallas interpreter."""
  return _override(_INTERPRET, backend, "interpret_mode backend")


@contextlib.contextmanager
def target_backend(backend: str = "tpu", generation: Optional[str] = None):
  """Within the block, :func:`pallas_attention` compiles ``backend``'s kernels (not interpreted) regardless of
  ``jax.default_backend()``: for AOT compiles that run on a CPU host but target TPU devices. ``generation``
  (``"v5e"``, ``"v6e"``, ``"v5p"``, ``"v4"``) names the TPU generation the kernel tiles are chosen for; None →
  the generation of the devices compiled for (:func:`kernels_pallas.tile_table.detect_generation`)."""
  if generation is not None and generation not in tile_table.GENERATIONS:
    raise ValueError(f"target_backend generation must be one of {tile_table.GENERATIONS} or None, got "
                     f"{generation!r}.")
  if generation is not None and backend != "tpu":
    raise ValueError(f"target_backend: generation={generation!r} names a TPU generation, but backend={backend!r}.")
  token = _GENERATION.set(generation)
  try:
    with _override(_TARGET, backend, "target_backend"):
      yield
  finally:
    _GENERATION.reset(token)


def tpu_generation() -> Optional[str]:
  """The TPU generation the kernels' tiles are chosen for: :func:`target_backend`'s, else the devices'."""
  return _GENERATION.get() or tile_table.detect_generation()


def _resolve(backend: Optional[str], interpret: bool) -> tuple[str, bool]:
  target = _TARGET.get()
  if backend is None and not interpret and target is not None:
    return target, False
  ctx = _INTERPRET.get()
  if backend is None and not interpret and ctx is not None:
    return ctx, True
  if backend is not None:
    if backend not in BACKENDS:
      raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    return backend, bool(interpret)
  default = jax.default_backend()
  if default in BACKENDS:
    return default, bool(interpret)
  if interpret:
    raise ValueError("interpret=True needs backend='tpu' or backend='gpu' to say which kernel to interpret.")
  raise RuntimeError(
      f"Pallas attention kernels need a TPU or GPU, but jax.default_backend() is {default!r}. Use "
      f"attention_impl='xla' on this host, or (tests) run the kernels in the Pallas interpreter: "
      f"`with ardiff.attention.interpret_mode(backend='tpu'|'gpu'):` or "
      f"pallas_attention(..., backend=..., interpret=True) (the kernels' own `interpret=` argument).")


# ------------------------------------------------------------------------------------------------------------------
# The Pallas path.


def pallas_attention(q, k, v, *, mask: masks_lib.Mask, q_offsets=None, q_segment_ids=None, kv_segment_ids=None,
                     kv_lengths=None, sm_scale=None, logit_soft_cap=None, backend: Optional[str] = None,
                     interpret: bool = False):
  """Masked attention through the Pallas kernels; same contract as :func:`reference_attention`.

  ``backend``/``interpret`` override the backend choice for one call (see the module docstring).
  """
  backend, interpret = _resolve(backend, interpret)
  # Resolved here, outside the shard_map, where the mesh in scope still names its devices.
  generation = tpu_generation() if backend == "tpu" else None
  call = functools.partial(_kernel_call, mask=mask, sm_scale=sm_scale, logit_soft_cap=logit_soft_cap,
                           backend=backend, interpret=interpret, generation=generation)
  if kv_lengths is None:
    _check_zero_offsets(q_offsets)
    q_offsets = None  # concrete zeros: the block-sparse kernel assumes them
  extras = dict(q_offsets=q_offsets, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                kv_lengths=kv_lengths)
  mesh = _sharding_mesh()
  if mesh is None:
    return call(q, k, v, **extras)
  return _sharded_call(call, mesh, q, k, v, extras)


def _check_zero_offsets(q_offsets) -> None:
  if q_offsets is None:
    return
  if isinstance(q_offsets, jax.core.Tracer):
    raise NotImplementedError(
        "q_offsets without kv_lengths must be None (or concrete zeros): the block-sparse kernel classifies tiles "
        "from static query positions starting at 0. A traced q_offsets cannot be checked; for queries at an "
        "offset into a cache pass kv_lengths so the call goes to decode_attention.")
  if not np.all(np.asarray(q_offsets) == 0):
    raise NotImplementedError(
        "nonzero q_offsets without kv_lengths are not supported by the block-sparse kernel (its tile map is "
        "built for queries starting at position 0). Pass kv_lengths (cached forward → decode_attention) or "
        "q_offsets=None.")


def _kernel_call(q, k, v, *, mask, q_offsets, q_segment_ids, kv_segment_ids, kv_lengths, sm_scale,
                 logit_soft_cap, backend, interpret, generation):
  if kv_lengths is not None:
    if q_segment_ids is not None or kv_segment_ids is not None:
      raise NotImplementedError(
          "segment ids with a KV cache (kv_lengths) are not supported: the decode kernel serves one sequence per "
          "batch row (ragged lengths replace packing). Unpack the batch, or use attention_impl='xla'.")
    if q_offsets is None:
      raise ValueError("kv_lengths was given without q_offsets: a cached forward needs each row's query offset "
                       "(the cache length before the write).")
    return decode_lib.decode_attention(q, k, v, q_offsets=q_offsets, kv_lengths=kv_lengths, mask=mask,
                                       sm_scale=sm_scale, logit_soft_cap=logit_soft_cap, backend=backend,
                                       interpret=interpret)
  return block_sparse_lib.block_sparse_attention(q, k, v, mask=mask, q_segment_ids=q_segment_ids,
                                                 kv_segment_ids=kv_segment_ids, sm_scale=sm_scale,
                                                 logit_soft_cap=logit_soft_cap, backend=backend,
                                                 interpret=interpret, generation=generation)


# ------------------------------------------------------------------------------------------------------------------
# shard_map around the kernel call, with specs from the logical axis rules.


def _sharding_mesh():
  """The abstract mesh to shard the kernel call over, or None (no mesh or one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size <= 1:
    return None
  return mesh


def _mesh_axes(entry, mesh) -> tuple:
  """The mesh axes one PartitionSpec entry names, keeping those of ``mesh`` (a rule may name an absent axis)."""
  names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return tuple(a for a in names if a in mesh.axis_names)


def kernel_partition_specs(mesh, rules=None) -> tuple[P, P]:
  """``(q_spec, kv_spec)``: the ``[batch, len, heads, head_dim]`` PartitionSpecs of the model's q and k/v
  activations under ``rules`` (default: the rules in scope, else :data:`ardiff.sharding.DEFAULT_RULES`).

  Raises when the rules shard a dimension the kernels need whole on every device (length, head_dim) or put heads
  and kv heads on different mesh axes (a device would hold query heads whose kv heads live elsewhere).
  """
  if rules is None:
    rules = nn.get_logical_axis_rules() or sharding_lib.DEFAULT_RULES
  specs = []
  for names in (Q_AXES, KV_AXES):
    spec = nn.logical_to_mesh_axes(names, rules)
    axes = [_mesh_axes(entry, mesh) for entry in spec]
    for name, dim_axes in zip(names, axes):
      if name in ("length", "head_dim") and dim_axes:
        raise NotImplementedError(
            f"the axis rules shard the {name!r} dimension over mesh axes {dim_axes}; the Pallas attention kernels "
            f"need whole sequences and head dims on each device. Map {name!r} to None in the rules, or use "
            f"attention_impl='xla'.")
    specs.append(P(*(a if len(a) > 1 else (a[0] if a else None) for a in axes)))
  q_spec, kv_spec = specs
  if q_spec[0] != kv_spec[0] or q_spec[2] != kv_spec[2]:
    raise ValueError(
        f"the axis rules place q as {q_spec} but k/v as {kv_spec}: the Pallas kernels need 'batch' and both "
        f"'heads' and 'kv_heads' on the same mesh axes (each device must hold the kv heads of its query heads). "
        f"Give 'heads' and 'kv_heads' the same rule.")
  return q_spec, kv_spec


def _sharded_call(call, mesh, q, k, v, extras):
  x_spec, _ = kernel_partition_specs(mesh)
  batch_axes, head_axes = _mesh_axes(x_spec[0], mesh), _mesh_axes(x_spec[2], mesh)
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  used = set(batch_axes) | set(head_axes)
  if manual and used <= manual:
    return call(q, k, v, **extras)  # already inside a shard_map over these axes: the caller holds per-device blocks
  if used & manual:
    raise NotImplementedError(f"pallas_attention inside a shard_map that is manual over only some of "
                              f"{sorted(used)} (manual: {sorted(manual)}) is not supported.")
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  n_batch, n_heads = math.prod(sizes[a] for a in batch_axes), math.prod(sizes[a] for a in head_axes)
  b, h, kvh = q.shape[0], q.shape[2], k.shape[2]
  if b % n_batch:
    raise ValueError(f"pallas_attention under a mesh: batch={b} must be divisible by the batch mesh axes "
                     f"{batch_axes} (size {n_batch}); use a batch that is a multiple of {n_batch} or a smaller "
                     f"mesh over those axes.")
  if h % n_heads or kvh % n_heads:
    raise ValueError(f"pallas_attention under a mesh: heads={h} and kv_heads={kvh} must both be divisible by the "
                     f"heads mesh axes {head_axes} (size {n_heads}). Replicate the kv heads up to a multiple of "
                     f"{n_heads} (e.g. num_kv_heads={n_heads * -(-kvh // n_heads)} with heads divisible by it), or "
                     f"use smaller {'/'.join(head_axes) or 'head'} mesh axes (a divisor of {kvh}).")
  row_spec, seg_spec = P(x_spec[0]), P(x_spec[0], None)
  # Absent operands stay out of the shard_map operands: only the given ones travel, in a dict.
  operands, specs = {}, {}
  for name, val in extras.items():
    if val is None:
      continue
    val = jnp.asarray(val, jnp.int32)
    if name in ("q_offsets", "kv_lengths"):
      val = jnp.broadcast_to(val.reshape(-1), (b,))
    operands[name], specs[name] = val, row_spec if name in ("q_offsets", "kv_lengths") else seg_spec

  def body(q, k, v, operands):
    return call(q, k, v, **{n: operands.get(n) for n in extras})

  return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, specs), out_specs=x_spec,
                       check_vma=False)(q, k, v, operands)
