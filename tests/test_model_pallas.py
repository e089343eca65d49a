"""The whole model with attention_impl='pallas' (kernels in interpret mode) equals the XLA reference path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks, objectives
from ardiff.config import ModelConfig
from ardiff.model import KVCache, Transformer, init_params
from kernels_pallas import dispatch

CFG = ModelConfig(vocab_size=40, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=64,
                  mask_token_id=39, init_std=0.2)
PARAMS = init_params(CFG, jax.random.key(0))
XLA, PALLAS = Transformer(CFG), Transformer(CFG.replace(attention_impl="pallas"))


# TPU-interpret gradients are covered kernel by kernel in test_block_sparse_attention.py (and cost ~50 s here).
@pytest.mark.parametrize("backend", ["gpu"])
def test_bd3_loss_and_gradients_match(backend):
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 39)
  cfg = objectives.ObjectiveConfig(block_size=8)
  batch = {"tokens": tokens, "segment_ids": jnp.concatenate([jnp.ones((2, 24), jnp.int32),
                                                             jnp.full((2, 8), 2, jnp.int32)], 1)}

  def value_and_grad(model):
    return jax.value_and_grad(objectives.make_loss_fn(model, cfg), has_aux=True)(PARAMS, batch, jax.random.key(2))

  (loss_x, _), grads_x = value_and_grad(XLA)
  with dispatch.interpret_mode(backend=backend):
    (loss_p, _), grads_p = value_and_grad(PALLAS)
  np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=1e-5)
  for gx, gp in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_p)):
    np.testing.assert_allclose(np.asarray(gp), np.asarray(gx), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_cached_block_step_matches(backend):
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 39)
  mask = masks.BlockCausal(4)
  cache = KVCache.init(CFG, 2, 128).advance(0)
  prefill = XLA.apply({"params": PARAMS}, tokens[:, :8], mask=mask, cache=cache).cache.advance(jnp.array([8, 4]))
  out_x = XLA.apply({"params": PARAMS}, tokens[:, 8:], mask=mask, cache=prefill)
  with dispatch.interpret_mode(backend=backend):
    out_p = PALLAS.apply({"params": PARAMS}, tokens[:, 8:], mask=mask, cache=prefill)
  np.testing.assert_allclose(np.asarray(out_p.logits), np.asarray(out_x.logits), atol=1e-5, rtol=1e-5)
