"""The XLA attention path's backward pass builds dq/dk/dv by concatenation, never from zero-padded full-length
gradients summed per row group and key run (ardiff.attention_xla._Pieces)."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks
from ardiff.attention_xla import plan, tiled_attention
from kernels_pallas.reference import reference_attention


def _primitives(jaxpr) -> set:
  out = set()
  for eqn in jaxpr.eqns:
    out.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _primitives(sub)
  return out


@pytest.mark.parametrize("mask, length", [(masks.BD3(64, 4), 128), (masks.Causal(), 128)])
def test_backward_has_no_padded_gradients_and_matches_the_reference(mask, length):
  assert len(plan(mask, length, length).groups) > 1  # several row groups with overlapping key runs
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, length, 4, 16)), jnp.float32) for _ in range(3))
  seg = jnp.asarray(np.repeat([[1, 1, 2, 2]], 2, 0).repeat(length // 4, 1), jnp.int32)
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask=mask, q_segment_ids=seg, kv_segment_ids=seg)))
  grad = jax.jit(jax.grad(loss(tiled_attention), (0, 1, 2)))  # jitted: op-by-op dispatch of the pieces takes minutes
  assert "pad" not in _primitives(jax.make_jaxpr(grad)(q, k, v).jaxpr)
  for got, want in zip(grad(q, k, v), jax.jit(jax.grad(loss(reference_attention), (0, 1, 2)))(q, k, v)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)
