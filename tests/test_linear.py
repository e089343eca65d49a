"""``ardiff.model.linear``: the CPU 2-D GEMM form equals the einsum it replaces (values and gradients), and the
other platforms keep the einsum's 3-D dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff.model import _trailing_contraction, linear


@pytest.mark.parametrize("equation, n, x_shape, w_shape", [("btd,dnh->btnh", 1, (2, 5, 6), (6, 3, 4)),
                                                            ("btnh,nhd->btd", 2, (2, 5, 3, 4), (3, 4, 6)),
                                                            ("btd,df->btf", 1, (2, 5, 6), (6, 7))])
def test_linear_equals_einsum_values_and_grads(equation, n, x_shape, w_shape):
  rng = np.random.default_rng(0)
  x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x_shape, w_shape))
  ct = jnp.asarray(rng.normal(size=jnp.einsum(equation, x, w).shape), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * ct)
  ref = jax.value_and_grad(loss(lambda x, w: jnp.einsum(equation, x, w)), (0, 1))(x, w)
  got = jax.jit(jax.value_and_grad(loss(lambda x, w: linear(x, w, n)), (0, 1)))(x, w)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_trailing_contraction_only_matches_plain_linear_maps():
  assert _trailing_contraction("btd,dnh->btnh") == 1
  assert _trailing_contraction("btnh,nhd->btd") == 2
  assert _trailing_contraction("btd,df->btf") == 1
  assert _trailing_contraction("btd,dnh->bnth") is None  # output axes reordered: stays an einsum
  assert _trailing_contraction("btnh,hnd->btd") is None  # contracted axes in another order
  with pytest.raises(ValueError, match="last 1 axes"):
    linear(jnp.zeros((2, 3)), jnp.zeros((4, 5)))


def test_non_cpu_lowering_keeps_the_3d_dot():
  x, w = jnp.zeros((2, 5, 6)), jnp.zeros((6, 7))
  text = jax.jit(linear).trace(x, w).lower(lowering_platforms=("tpu",)).as_text()
  assert "tensor<2x5x7xf32>" in text and "tensor<10x6xf32>" not in text
  text_cpu = jax.jit(linear).trace(x, w).lower(lowering_platforms=("cpu",)).as_text()
  assert "tensor<10x6xf32>" in text_cpu
