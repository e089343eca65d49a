"""The layer stack compiled for CPU runs the ``scan_layers`` loop fully unrolled (``ardiff.model._scan_unroll``);
it must equal the rolled loop other platforms keep: logits, loss gradients and the cached forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import attention as attention_lib
from ardiff import masks
from ardiff.config import ModelConfig
from ardiff.model import KVCache, Transformer, _scan_unroll, init_params

CFG = ModelConfig(vocab_size=19, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=24,
                  mask_token_id=18, attention_impl="xla")


@pytest.fixture(scope="module")
def params():
  return jax.jit(lambda rng: init_params(CFG, rng))(jax.random.PRNGKey(0))  # eager init is ~20x slower


def _loss_and_grads(cfg, params, tokens):
  def loss(p):
    out = Transformer(cfg).apply({"params": p}, tokens, mask=masks.BD3(4, 2), logits_len=4)
    return jnp.sum(jax.nn.log_softmax(out.logits)[..., 3]) + jnp.sum(out.hidden ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)  # a new function: traced again under each context


def test_unrolled_stack_equals_rolled_loop(params):
  cfg = CFG
  assert _scan_unroll(cfg) == cfg.num_layers  # this host compiles for CPU
  with attention_lib.target_backend("tpu"):  # an AOT compile for TPU keeps the rolled loop
    assert _scan_unroll(cfg) == 1
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 18, (2, 8)), jnp.int32)
  unrolled = _loss_and_grads(cfg, params, tokens)
  with attention_lib.target_backend("tpu"):  # the XLA attention path ignores the Pallas target: only the loop changes
    rolled = _loss_and_grads(cfg, params, tokens)
  for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(rolled)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unrolled_cached_forward_equals_rolled_loop(params):
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 18, (2, 5)), jnp.int32)

  def run():
    @jax.jit  # a new function per call: traced again under each context
    def forward(params):
      out = Transformer(CFG).apply({"params": params}, tokens, mask=masks.Causal(), cache=KVCache.init(CFG, 2, 8))
      return out.logits, out.cache.k, out.cache.v
    return forward(params)
  unrolled = run()
  with attention_lib.target_backend("tpu"):
    rolled = run()
  for a, b in zip(unrolled, rolled):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
