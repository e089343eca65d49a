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
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import jax
import numpy as np

from ardiff import masks as masks_lib
from kernels_pallas import decode_attention as decode_lib

_INTERPRET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("ardiff_pallas_interpret", default=None)


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


def _resolve(backend: Optional[str], interpret: bool) -> tuple[str, bool]:
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
