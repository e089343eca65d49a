"""What every kernel in :mod:`kernels_pallas` shares: the backend resolution, the interpreter settings, ``NEG_INF``,
the online-softmax step and the one check of whether a mask predicate can run inside a kernel.

This package depends on jax and :mod:`ardiff.masks` (a leaf) only; the model-side routing
(``ardiff.attention``) imports from here, never the other way round.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.extend
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from ardiff import masks as masks_lib

NEG_INF = -1e30  # finite "minus infinity": a fully masked row never produces inf - inf (NaN)
BACKENDS = ("tpu", "gpu")


def is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def resolve_backend(backend: Optional[str], interpret, *, kernel: str) -> str:
  """``backend`` if given, else ``jax.default_backend()`` (which must then be TPU or GPU).

  An explicit backend is trusted without ``interpret``: that is how AOT compiles for a TPU topology from a CPU host
  work (running it eagerly on the wrong host fails inside ``pallas_call``). ``kernel`` names the caller in errors.
  """
  if backend is None:
    backend = jax.default_backend()
    if backend not in BACKENDS:
      raise ValueError(
          f"Pallas {kernel} kernels run on TPU or GPU, but jax.default_backend() is {backend!r}; on this host pass "
          f"backend='tpu' or backend='gpu' together with interpret=True to run that kernel in the interpreter.")
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None (jax.default_backend()), got {backend!r}.")
  if isinstance(interpret, pltpu.InterpretParams) and backend != "tpu":
    raise ValueError("interpret=pltpu.InterpretParams(...) is for backend='tpu'; use interpret=True for 'gpu'.")
  return backend


def interpret_arg(backend: str, interpret):
  """The ``interpret=`` value for ``pallas_call``: False (compile), ``pltpu.InterpretParams`` for TPU (simulated
  VMEM/SMEM and DMAs; an instance passed in is kept) or True (generic interpreter) for GPU."""
  if not interpret:
    return False
  if backend == "tpu":
    return interpret if isinstance(interpret, pltpu.InterpretParams) else pltpu.InterpretParams()
  return True


def online_softmax_step(s, allowed, v, m_prev, l_prev, acc_prev):
  """One flash-attention step over a kv tile.

  ``s``: f32 ``[rows, cols]`` logits; ``allowed``: bool ``[rows, cols]`` or None (every entry allowed); ``v``:
  ``[cols, d]``; ``m_prev``/``l_prev``: f32 ``[rows, 1]`` running max and denominator; ``acc_prev``: f32
  ``[rows, d]``. Returns the new ``(m, l, acc)``. Masked entries contribute an exact 0 (not ``exp(NEG_INF - m)``,
  which is 1 when the whole row is masked so far).
  """
  if allowed is not None:
    s = jnp.where(allowed, s, NEG_INF)
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - m_new)
  if allowed is not None:
    p = jnp.where(allowed, p, 0.0)
  alpha = jnp.exp(m_prev - m_new)
  l_new = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
  acc_new = alpha * acc_prev + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return m_new, l_new, acc_new


# Primitives that read a captured table: they cannot run on in-kernel iotas (Mosaic/Triton have no gathers of
# closed-over arrays), so such masks go through a host- or XLA-built table instead.
_TABLE_PRIMITIVES = frozenset({"gather", "dynamic_slice", "scatter", "scatter-add", "dynamic_update_slice"})


def _sub_jaxprs(value):
  """The jaxprs held by one equation parameter: a (Closed)Jaxpr, or a tuple/list of them (``cond`` branches)."""
  if isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)
  elif isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield jax.extend.core.ClosedJaxpr(value, ())


def _plain(closed) -> bool:
  if closed.consts:
    return False
  for eqn in closed.jaxpr.eqns:
    if eqn.primitive.name in _TABLE_PRIMITIVES:
      return False
    for param in eqn.params.values():  # nested jaxprs: pjit, custom_jvp_call, cond branches, while bodies, ...
      if not all(_plain(sub) for sub in _sub_jaxprs(param)):
        return False
  return True


@functools.lru_cache(maxsize=256)
def predicate_runs_in_kernel(mask: masks_lib.Mask) -> bool:
  """Whether ``mask.predicate`` is pure elementwise integer arithmetic (no captured tables, no gathers), looking
  inside every nested jaxpr (calls, ``cond`` branches, loops). Such a predicate is evaluated on iotas in the
  kernel; any other mask needs a table of its allowed entries."""
  try:
    closed = jax.make_jaxpr(mask.predicate)(jax.ShapeDtypeStruct((8, 1), jnp.int32),
                                            jax.ShapeDtypeStruct((1, 128), jnp.int32))
  except Exception:  # noqa: BLE001 - anything jnp cannot trace abstractly needs the table
    return False
  return _plain(closed)
