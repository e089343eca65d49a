"""The ``scan_layers`` stack of an uncached forward: unrolled when compiled for CPU, a rolled loop for TPU/GPU
(chosen at lowering), equal to the per-layer Python loop in values and gradients; cached forwards keep the rolled
``nn.scan`` so the stacked KV cache is never copied."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks, objectives
from ardiff.config import ModelConfig
from ardiff.model import KVCache, Transformer, init_params

CFG = ModelConfig(vocab_size=40, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
                  mask_token_id=39, init_std=0.3)
PARAMS = init_params(CFG, jax.random.key(0))
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, 39)
BATCH = {"tokens": TOKENS, "segment_ids": jnp.concatenate([jnp.ones((2, 10), jnp.int32),
                                                           jnp.full((2, 6), 2, jnp.int32)], 1)}


def _looped_params(stacked):
  """The same weights in the scan_layers=False layout (``layers_0``, ``layers_1``, ...)."""
  p = {k: v for k, v in stacked.items() if k != "layers"}
  for i in range(CFG.num_layers):
    p[f"layers_{i}"] = jax.tree.map(lambda a: a[i], stacked["layers"])
  return p


def _loss_and_grads(cfg, params, kind):
  obj = objectives.ObjectiveConfig(kind=kind, block_size=4)
  fn = jax.jit(jax.value_and_grad(objectives.make_loss_fn(Transformer(cfg), obj), has_aux=True))
  (loss, _), grads = fn(params, BATCH, jax.random.key(2))
  return loss, grads


@pytest.mark.parametrize("kind", ["ar", "block_diffusion"])
@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_scanned_stack_equals_per_layer_loop(kind, remat):
  loss_s, grads_s = _loss_and_grads(CFG.replace(remat_policy=remat), PARAMS, kind)
  loss_l, grads_l = _loss_and_grads(CFG.replace(remat_policy=remat, scan_layers=False), _looped_params(PARAMS), kind)
  np.testing.assert_allclose(float(loss_s), float(loss_l), rtol=1e-6)
  grads_l = {k: v for k, v in grads_l.items() if not k.startswith("layers_")} | {
      "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *(grads_l[f"layers_{i}"] for i in range(CFG.num_layers)))}
  for (path, gs), gl in zip(jax.tree_util.tree_leaves_with_path(grads_s), jax.tree.leaves(grads_l)):
    np.testing.assert_allclose(np.asarray(gs), np.asarray(gl), atol=1e-6, rtol=1e-5, err_msg=str(path))


def _train_text(platform: str) -> str:
  obj = objectives.ObjectiveConfig(kind="ar")  # no noise draw: the layer stack is the only loop it could have
  grad = jax.grad(lambda p: objectives.make_loss_fn(Transformer(CFG), obj)(p, BATCH, jax.random.key(2))[0])
  return jax.jit(grad).trace(PARAMS).lower(lowering_platforms=(platform,)).as_text()


def test_cpu_lowering_unrolls_the_layers_and_tpu_keeps_the_loop():
  """Decided at lowering for the platform compiled for (an AOT TPU compile from this CPU host gets the loop)."""
  assert "stablehlo.while" not in _train_text("cpu")
  assert "stablehlo.while" in _train_text("tpu")


def test_cached_forward_keeps_the_rolled_loop_and_updates_the_cache_in_place():
  """Unrolled, the per-layer cache slices would be re-stacked into a new whole cache; rolled and donated, the
  compiled CPU forward aliases K and V to its outputs (tests/test_model_pallas.py checks the TPU compile's
  temporaries where libtpu is installed)."""
  cache = KVCache.init(CFG, 2, 64)
  model = Transformer(CFG)

  def step(params, tokens, cache):
    out = model.apply({"params": params}, tokens, mask=masks.BlockCausal(4), cache=cache)
    return out.logits, out.cache

  lowered = jax.jit(step, donate_argnums=(2,)).trace(PARAMS, TOKENS[:, :4], cache).lower()
  assert "stablehlo.while" in lowered.as_text()
  compiled = lowered.compile()
  aliases = re.search(r"input_output_alias=\{([^\n]*)\}", compiled.as_text())
  assert aliases and aliases.group(1).count("may-alias") >= 2, "the donated K and V caches are not aliased"


def test_params_without_a_layer_stack_are_rejected_by_name():
  with pytest.raises(ValueError, match="scan_layers"):
    Transformer(CFG).apply({"params": _looped_params(PARAMS)}, TOKENS, mask=masks.Causal())


@pytest.mark.parametrize("scan", [True, False])
def test_logits_len_returns_the_first_rows_and_computes_only_them_in_the_last_layer(scan):
  """BD3's clean half needs no output: with ``logits_len`` the last layer's queries, MLP and the head cover the
  first rows only (the rest stay keys and values), and those rows equal the full forward's."""
  cfg = CFG.replace(scan_layers=scan)
  params = PARAMS if scan else _looped_params(PARAMS)
  mask = masks.BD3(8, 4)
  tokens = jnp.concatenate([TOKENS[:, :8], jnp.full((2, 8), 39, jnp.int32)], 1)
  apply = lambda logits_len: Transformer(cfg).apply({"params": params}, tokens, mask=mask, logits_len=logits_len)
  full, top = jax.jit(lambda: apply(None))(), jax.jit(lambda: apply(8))()
  assert top.logits.shape == (2, 8, 40) and top.hidden.shape == (2, 8, 32)
  np.testing.assert_allclose(np.asarray(top.logits), np.asarray(full.logits[:, :8]), atol=2e-6, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(top.hidden), np.asarray(full.hidden[:, :8]), atol=2e-6, rtol=1e-6)
  # The last layer's MLP runs on 8 rows, every other layer's on 16 (a scanned stack: the CPU branch's layers).
  jaxpr = str(jax.make_jaxpr(lambda: apply(8))())
  assert jaxpr.count("f32[2,8,48]") > 0 and jaxpr.count("f32[2,16,48]") > 0
  with pytest.raises(ValueError, match="logits_len=17"):
    apply(17)
