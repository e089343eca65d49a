"""``pallas_attention``: the Pallas side of ``ardiff.attention.attention(..., impl="pallas")``.

Routing
-------
* ``kv_lengths`` given (a cached forward: AR token, diffusion block, speculative draft, TiDAR rows) →
  :func:`kernels_pallas.decode_attention.decode_attention`.
* otherwise (training / full-sequence forward) → ``kernels_pallas.block_sparse_attention.block_sparse_attention``
  (imported lazily).

Backend
-------
The backend is ``jax.default_backend()``: ``"tpu"`` and ``"gpu"`` run the compiled kernels. On ``"cpu"`` this
raises: the kernels need a TPU or GPU, and nothing falls back to XLA silently (use ``attention_impl="xla"`` for
the dense path). To run the kernels on a CPU host (tests), route them through the Pallas interpreter either

* for one call: ``pallas_attention(..., backend="tpu", interpret=True)``, or
* for everything inside a block, including calls made by the model through ``ardiff.attention.attention``::

      with dispatch.interpret_mode(backend="tpu"):   # or "gpu"
        logits = model.apply(...)

  ``backend="tpu"`` interprets the Mosaic kernels (``pltpu.InterpretParams``, slow but faithful: simulated
  VMEM/SMEM and DMAs); ``backend="gpu"`` interprets the Triton kernels with generic ``interpret=True`` (fast).

* AOT compiles for a TPU slice from a CPU host (``ardiff.training.aot``): ``with dispatch.target_backend("tpu"):``
  makes the *compiled* kernels of that backend the choice (not the interpreter), whatever the running backend.

Sharding
--------
When an abstract mesh with more than one device is in scope (``jax.set_mesh``, e.g. via
``ardiff.sharding.activation_sharding``) Mosaic/Triton calls cannot be partitioned automatically, so the kernel
call is wrapped in ``jax.shard_map``: batch over ``("data", "fsdp")``, heads and kv heads over ``"tensor"`` (each
device runs the kernel on its own batch rows and heads; no communication). Requires the batch to divide
``data * fsdp`` and both ``heads`` and ``kv_heads`` to divide by ``tensor``. Gradients flow through the
``shard_map`` and the kernels' ``custom_vjp``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Optional

import jax
import numpy as np

from ardiff import masks as masks_lib
from kernels_pallas import decode_attention as decode_lib

_INTERPRET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("ardiff_pallas_interpret", default=None)
_TARGET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("ardiff_pallas_target", default=None)

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


@contextlib.contextmanager
def interpret_mode(backend: str = "tpu"):
  """Within the block, :func:`pallas_attention` runs ``backend``'s kernels in the Pallas interpreter."""
  if backend not in decode_lib.BACKENDS:
    raise ValueError(f"interpret_mode backend must be one of {decode_lib.BACKENDS}, got {backend!r}.")
  token = _INTERPRET.set(backend)
  try:
    yield
  finally:
    _INTERPRET.reset(token)


@contextlib.contextmanager
def target_backend(backend: str = "tpu"):
  """Within the block, :func:`pallas_attention` compiles ``backend``'s kernels (not interpreted) regardless of
  ``jax.default_backend()``: for AOT compiles that run on a CPU host but target TPU devices."""
  if backend not in decode_lib.BACKENDS:
    raise ValueError(f"target_backend must be one of {decode_lib.BACKENDS}, got {backend!r}.")
  token = _TARGET.set(backend)
  try:
    yield
  finally:
    _TARGET.reset(token)


def _resolve(backend: Optional[str], interpret: bool) -> tuple[str, bool]:
  target = _TARGET.get()
  if backend is None and not interpret and target is not None:
    return target, False
  ctx = _INTERPRET.get()
  if backend is None and not interpret and ctx is not None:
    return ctx, True
  if backend is not None:
    if backend not in decode_lib.BACKENDS:
      raise ValueError(f"backend must be one of {decode_lib.BACKENDS}, got {backend!r}.")
    return backend, bool(interpret)
  default = jax.default_backend()
  if default in decode_lib.BACKENDS:
    return default, bool(interpret)
  if interpret:
    raise ValueError("interpret=True needs backend='tpu' or backend='gpu' to say which kernel to interpret.")
  raise RuntimeError(
      f"Pallas attention kernels need a TPU or GPU, but jax.default_backend() is {default!r}. Use "
      f"attention_impl='xla' on this host, or (tests) run the kernels in the Pallas interpreter: "
      f"`with kernels_pallas.dispatch.interpret_mode(backend='tpu'|'gpu'):` or "
      f"pallas_attention(..., backend=..., interpret=True) (the kernels' own `interpret=` argument).")


def _offsets_are_zero(q_offsets) -> bool:
  if q_offsets is None:
    return True
  if isinstance(q_offsets, jax.core.Tracer):
    raise NotImplementedError(
        "q_offsets without kv_lengths must be None (or concrete zeros): the block-sparse kernel classifies tiles "
        "from static query positions starting at 0. A traced q_offsets cannot be checked; for queries at an "
        "offset into a cache pass kv_lengths so the call goes to decode_attention.")
  return bool(np.all(np.asarray(q_offsets) == 0))


def pallas_attention(q, k, v, *, mask: masks_lib.Mask, q_offsets=None, q_segment_ids=None, kv_segment_ids=None,
                     kv_lengths=None, sm_scale=None, logit_soft_cap=None, backend: Optional[str] = None,
                     interpret: bool = False):
  """Masked attention through the Pallas kernels; same contract as ``ardiff.attention.reference_attention``.

  ``backend``/``interpret`` override the backend choice for one call (see the module docstring); by default the
  backend is ``jax.default_backend()`` (or the enclosing :func:`interpret_mode`).
  """
  backend, interpret = _resolve(backend, interpret)
  call = functools.partial(_kernel_call, mask=mask, sm_scale=sm_scale, logit_soft_cap=logit_soft_cap,
                           backend=backend, interpret=interpret)
  mesh = _sharding_mesh()
  if mesh is None:
    return call(q, k, v, q_offsets=q_offsets, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                kv_lengths=kv_lengths)
  return _sharded_call(call, mesh, q, k, v, q_offsets=q_offsets, q_segment_ids=q_segment_ids,
                       kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths)


def _sharding_mesh():
  """The abstract mesh to shard the kernel call over, or None (no mesh, one device, or already manual)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size <= 1:
    return None
  names = [a for a in (*BATCH_AXES, HEAD_AXIS) if a in mesh.axis_names]
  if not names:
    raise ValueError(f"pallas_attention under a mesh with axes {mesh.axis_names}: expected axes {BATCH_AXES} "
                     f"(batch) and {HEAD_AXIS!r} (heads); build the mesh with ardiff.sharding.make_mesh.")
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  if all(a in manual for a in names):
    return None  # already inside a shard_map over these axes: the caller holds per-device blocks
  if any(a in manual for a in names):
    raise NotImplementedError(f"pallas_attention inside a shard_map that is manual over only some of {names} "
                              f"(manual: {sorted(manual)}) is not supported.")
  return mesh


def _axis_size(mesh, names) -> int:
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return int(np.prod([sizes[a] for a in names])) if names else 1


def _sharded_call(call, mesh, q, k, v, *, q_offsets, q_segment_ids, kv_segment_ids, kv_lengths):
  from jax.sharding import PartitionSpec as P

  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  head_axis = HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None
  n_batch, n_heads = _axis_size(mesh, batch_axes), _axis_size(mesh, (head_axis,) if head_axis else ())
  b, h, kvh = q.shape[0], q.shape[2], k.shape[2]
  if b % n_batch:
    raise ValueError(f"pallas_attention under a mesh: batch={b} must be divisible by the batch mesh axes "
                     f"{batch_axes} (size {n_batch}); use a batch that is a multiple of {n_batch} or a smaller "
                     f"data/fsdp mesh.")
  if h % n_heads or kvh % n_heads:
    raise ValueError(f"pallas_attention under a mesh: heads={h} and kv_heads={kvh} must both be divisible by the "
                     f"'{HEAD_AXIS}' mesh axis (size {n_heads}). Replicate the kv heads up to a multiple of "
                     f"{n_heads} (e.g. num_kv_heads={n_heads * -(-kvh // n_heads)} with heads divisible by it), or "
                     f"use a smaller tensor axis (a divisor of {kvh}).")
  bspec = batch_axes if batch_axes else None
  x_spec = P(bspec, None, head_axis, None)
  seg_spec, row_spec = P(bspec, None), P(bspec)

  # Optional operands travel as a dict so None entries stay out of the shard_map operands.
  extras, extra_specs = {}, {}
  for name, val, spec in (("q_offsets", q_offsets, row_spec), ("q_segment_ids", q_segment_ids, seg_spec),
                          ("kv_segment_ids", kv_segment_ids, seg_spec), ("kv_lengths", kv_lengths, row_spec)):
    if val is None:
      continue
    if name == "q_offsets" and kv_lengths is None:
      if not _offsets_are_zero(val):
        raise NotImplementedError(
            "nonzero q_offsets without kv_lengths are not supported by the block-sparse kernel (its tile map is "
            "built for queries starting at position 0). Pass kv_lengths (cached forward → decode_attention) or "
            "q_offsets=None.")
      continue  # concrete zeros: the block-sparse kernel assumes them
    val = jax.numpy.asarray(val, jax.numpy.int32)
    if name in ("q_offsets", "kv_lengths"):
      val = jax.numpy.broadcast_to(val.reshape(-1), (b,))
    extras[name], extra_specs[name] = val, spec

  def body(q, k, v, extras):
    return call(q, k, v, **{n: extras.get(n) for n in ("q_offsets", "q_segment_ids", "kv_segment_ids",
                                                        "kv_lengths")})

  return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, extra_specs), out_specs=x_spec,
                       check_vma=False)(q, k, v, extras)


def _kernel_call(q, k, v, *, mask, q_offsets, q_segment_ids, kv_segment_ids, kv_lengths, sm_scale,
                 logit_soft_cap, backend, interpret):
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
  if not _offsets_are_zero(q_offsets):
    raise NotImplementedError(
        "nonzero q_offsets without kv_lengths are not supported by the block-sparse kernel (its tile map is "
        "built for queries starting at position 0). Pass kv_lengths (cached forward → decode_attention) or "
        "q_offsets=None.")
  from kernels_pallas.block_sparse_attention import block_sparse_attention  # lazy: a colleague's module

  return block_sparse_attention(q, k, v, mask=mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                sm_scale=sm_scale, logit_soft_cap=logit_soft_cap, backend=backend,
                                interpret=interpret)
