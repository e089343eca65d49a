"""Sharded forward/gradients equal single-device ones; params really sharded; clear divisibility errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ardiff import masks, sharding
from ardiff.config import ModelConfig
from ardiff.model import Transformer
from ardiff.objectives import ObjectiveConfig, make_loss_fn

CFG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  mask_token_id=63)
B, L = 8, 16


@pytest.fixture(scope="module")
def setup():
  model = Transformer(CFG)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  params = sharding.init_sharded_params(model, mesh, jax.random.key(0), example_tokens=jnp.zeros((2, L), jnp.int32))
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, 63, dtype=jnp.int32)
  batch = {"tokens": tokens, "segment_ids": jnp.ones((B, L), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)),
           "loss_mask": jnp.ones((B, L), jnp.int32)}
  return model, mesh, params, batch


def _local(tree):
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), tree)


def test_make_mesh_fill_and_errors():
  mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh(data=-1, fsdp=1, tensor=1).shape)["data"] == 8
  assert dict(sharding.make_mesh(1, 4, 1, devices=jax.devices()[:4]).shape) == {"data": 1, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="does not divide the 8"):
    sharding.make_mesh(data=-1, fsdp=3, tensor=1)
  with pytest.raises(ValueError, match="needs 12 devices"):
    sharding.make_mesh(data=3, fsdp=2, tensor=2)


def test_params_are_sharded(setup):
  model, mesh, params, _ = setup
  q = params["layers"]["self_attn"]["q_proj"]["kernel"]  # (layers, embed, heads, head_dim)
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert params["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert params["layers"]["mlp"]["down_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
  sharding.assert_params_sufficiently_sharded(params, mesh, min_fraction=0.9)
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  with pytest.raises(AssertionError, match="sharded"):
    sharding.assert_params_sufficiently_sharded(replicated, mesh)
  # a single-device mesh never complains
  sharding.assert_params_sufficiently_sharded(replicated, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def test_sharded_forward_and_grads_match_single_device(setup):
  model, mesh, params, batch = setup
  loss_fn = make_loss_fn(model, ObjectiveConfig(kind="block_diffusion", block_size=4))
  rng = jax.random.key(7)
  fwd = lambda p, t: model.apply({"params": p}, t, mask=masks.Causal()).logits
  grad_fn = lambda p, b, r: jax.value_and_grad(lambda q: loss_fn(q, b, r)[0])(p)

  # single device reference
  p1, b1 = _local(params), _local(batch)
  logits_ref = jax.jit(fwd)(p1, b1["tokens"])
  loss_ref, g_ref = jax.jit(grad_fn)(p1, b1, rng)

  bsh = sharding.batch_sharding(mesh)
  bsharded = jax.device_put(batch, bsh)
  # No jax.set_mesh: under a global mesh flax's DenseGeneral param shape check applies the 3-axis logical
  # constraint to the flattened 2-D kernel (model.py q/k/v_proj) and fails. Shardings propagate from the inputs.
  with nn.logical_axis_rules(sharding.DEFAULT_RULES):
    logits = jax.jit(fwd)(params, bsharded["tokens"])
    loss, g = jax.jit(grad_fn)(params, bsharded, rng)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_ref), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(loss_ref), atol=1e-5, rtol=1e-5)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4, err_msg=str(path[0]))
  # gradients keep the parameter shardings
  gq, pq = g["layers"]["self_attn"]["q_proj"]["kernel"], params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert gq.sharding.is_equivalent_to(pq.sharding, gq.ndim)


def test_divisibility_errors_are_clear():
  sizes = dict(sharding.make_mesh(data=2, fsdp=2, tensor=2).shape)
  sharding.check_divisibility(CFG, sizes)
  bad = CFG.replace(num_heads=3, num_kv_heads=1, vocab_size=63, mask_token_id=62)
  with pytest.raises(ValueError) as e:
    sharding.check_divisibility(bad, sizes)
  for part in ("model.num_heads=3 is not", "model.num_kv_heads=1 is not", "model.vocab_size=63 is not",
               "mesh.tensor=2"):
    assert part in str(e.value)
  with pytest.raises(ValueError, match="model.embed_dim=31 is not divisible by mesh.fsdp=2"):
    sharding.check_divisibility(CFG.replace(embed_dim=31), sizes)
  # the rules decide: vocab replicated instead of split over tensor, or split over fsdp*tensor
  rules = dict(sharding.DEFAULT_RULES)
  sharding.check_divisibility(bad.replace(num_heads=4, num_kv_heads=2), sizes, tuple({**rules, "vocab": None}.items()))
  with pytest.raises(ValueError, match=r"model.mlp_dim=6 is not divisible by mesh.fsdp=2\*mesh.tensor=2"):
    sharding.check_divisibility(CFG.replace(mlp_dim=6), sizes, tuple({**rules, "mlp": ("fsdp", "tensor")}.items()))


def test_validate_refuses_a_model_dim_the_mesh_cannot_split():
  """experiment.validate runs the same check up front: the byte vocabulary (259 ids) cannot be split over tensor=2
  (without it, jax stops with an IndivisibleError from inside the parameter init)."""
  from ardiff import experiment
  c = experiment.base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
  with pytest.raises(ValueError, match="model.vocab_size=259 is not divisible by mesh.tensor=2"):
    experiment.validate(c, devices=jax.devices())
  c.model.vocab_size = 260
  experiment.validate(c, devices=jax.devices())
