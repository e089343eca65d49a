"""Pallas attention inside a sharded jit: the kernel call is wrapped in shard_map with specs from the logical axis
rules in scope (default: batch over data×fsdp, heads over tensor; any other rules table likewise) and equals the
dense reference; the whole model's BD3 loss and grads match the XLA path; the TPU AOT compile of the train step
with attention_impl='pallas' compiles the Mosaic kernels and fits."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ardiff import masks, objectives, sharding
from ardiff.attention import attention, reference_attention
from ardiff.config import ModelConfig
from ardiff.model import Transformer
from ardiff import attention as attention_lib

MESH = sharding.make_mesh(data=2, fsdp=2, tensor=2)
X_SPEC = P(("data", "fsdp"), None, "tensor", None)
# Non-default rules: batch over data only, heads over fsdp×tensor (embed replicated). A batch of 2 and 4 heads
# split exactly under these rules but not under the defaults (batch over data×fsdp = 4).
RULES_HEADS_ON_FSDP = (
    ("batch", "data"), ("embed", None), ("mlp", "tensor"), ("heads", ("fsdp", "tensor")),
    ("kv_heads", ("fsdp", "tensor")), ("vocab", "tensor"), ("length", None), ("head_dim", None), ("layers", None))


@contextlib.contextmanager
def _pallas_under(rules):
  """The mesh and ``rules`` in scope, the GPU (Triton) kernels in the interpreter."""
  with sharding.activation_sharding(MESH, rules), attention_lib.interpret_mode(backend="gpu"):
    yield


def _put(x, spec):
  return jax.device_put(x, NamedSharding(MESH, spec))


def _qkv(key, b, t, s, h, kvh, d):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (b, t, h, d), jnp.float32)
  k = jax.random.normal(kk, (b, s, kvh, d), jnp.float32)
  v = jax.random.normal(kv, (b, s, kvh, d), jnp.float32)
  return q, k, v


def test_bd3_forward_and_grad_match_reference_under_mesh():
  n, b, h, kvh, d = 16, 4, 4, 2, 16
  mask = masks.BD3(n, 4)
  q, k, v = _qkv(jax.random.key(0), b, 2 * n, 2 * n, h, kvh, d)
  seg = jnp.concatenate([jnp.ones((b, n), jnp.int32)] * 2, 1)  # BD3 layout: [x_t | x_0], one sequence each
  qs, ks, vs = (_put(x, X_SPEC) for x in (q, k, v))
  segs = _put(seg, P(("data", "fsdp"), None))

  def loss(impl, q, k, v, seg):
    out = attention(q, k, v, mask=mask, impl=impl, q_segment_ids=seg, kv_segment_ids=seg)
    return jnp.sum(out * jnp.cos(out)), out

  def run(impl):
    return jax.jit(jax.value_and_grad(lambda q, k, v, s: loss(impl, q, k, v, s), argnums=(0, 1, 2),
                                      has_aux=True))(qs, ks, vs, segs)

  with _pallas_under(sharding.DEFAULT_RULES):
    (l_p, out_p), g_p = run("pallas")
    jaxpr = str(jax.make_jaxpr(lambda q, k, v, s: loss("pallas", q, k, v, s)[0])(qs, ks, vs, segs))
  assert "shard_map" in jaxpr  # the kernel call is partitioned by hand, not by the auto partitioner
  (l_r, out_r), g_r = jax.value_and_grad(lambda q, k, v, s: loss("xla", q, k, v, s), argnums=(0, 1, 2),
                                         has_aux=True)(q, k, v, seg)
  np.testing.assert_allclose(np.asarray(out_p), np.asarray(out_r), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(float(l_p), float(l_r), rtol=1e-5)
  for gp, gr in zip(g_p, g_r):
    np.testing.assert_allclose(np.asarray(gp), np.asarray(gr), atol=5e-5, rtol=1e-4)


def test_cached_decode_matches_reference_under_mesh():
  b, t, s, h, kvh, d = 4, 4, 64, 4, 2, 16
  mask = masks.BlockCausal(4)
  q, k, v = _qkv(jax.random.key(1), b, t, s, h, kvh, d)
  q_offsets = jnp.array([0, 4, 8, 20], jnp.int32)
  kv_lengths = q_offsets + t
  row = P(("data", "fsdp"))

  def f(impl, q, k, v, qo, kl):
    return attention(q, k, v, mask=mask, impl=impl, q_offsets=qo, kv_lengths=kl)

  with _pallas_under(sharding.DEFAULT_RULES):
    out_p = jax.jit(lambda *a: f("pallas", *a))(_put(q, X_SPEC), _put(k, X_SPEC), _put(v, X_SPEC),
                                                _put(q_offsets, row), _put(kv_lengths, row))
  out_r = reference_attention(q, k, v, mask=mask, q_offsets=q_offsets, kv_lengths=kv_lengths)
  np.testing.assert_allclose(np.asarray(out_p), np.asarray(out_r), atol=2e-5, rtol=2e-5)


def test_indivisible_heads_and_batch_raise_clearly():
  mask = masks.BlockCausal(4)
  with _pallas_under(sharding.DEFAULT_RULES):
    q, k, v = _qkv(jax.random.key(2), 4, 8, 8, 3, 1, 16)
    with pytest.raises(ValueError, match="kv_heads=1.*tensor"):
      jax.jit(lambda q, k, v: attention(q, k, v, mask=mask, impl="pallas"))(q, k, v)
    q, k, v = _qkv(jax.random.key(2), 2, 8, 8, 4, 2, 16)
    with pytest.raises(ValueError, match="batch=2"):
      jax.jit(lambda q, k, v: attention(q, k, v, mask=mask, impl="pallas"))(q, k, v)


def _assert_model_bd3_pallas_matches_xla(rules, *, batch_size: int, num_kv_heads: int):
  """The whole model's BD3 loss and grads under ``rules`` on MESH: Pallas (GPU interpret) equals XLA. Returns the
  jaxpr of the Pallas loss."""
  cfg = ModelConfig(vocab_size=40, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads,
                    head_dim=16, mlp_dim=64, mask_token_id=39)
  xla, pallas = Transformer(cfg), Transformer(cfg.replace(attention_impl="pallas"))
  params = sharding.init_sharded_params(xla, MESH, jax.random.key(0), rules)
  tokens = jax.random.randint(jax.random.key(1), (batch_size, 16), 0, 39)
  batch = {"tokens": tokens, "segment_ids": jnp.ones((batch_size, 16), jnp.int32)}
  batch = jax.device_put(batch, NamedSharding(MESH, P(nn.logical_to_mesh_axes(("batch",), rules)[0], None)))
  obj = objectives.ObjectiveConfig(block_size=4)

  def value_and_grad(model):
    fn = jax.value_and_grad(objectives.make_loss_fn(model, obj), has_aux=True)
    return jax.jit(fn)(params, batch, jax.random.key(2))

  with sharding.activation_sharding(MESH, rules):
    (loss_x, _), grads_x = value_and_grad(xla)
    with attention_lib.interpret_mode(backend="gpu"):
      (loss_p, _), grads_p = value_and_grad(pallas)
      jaxpr = str(jax.make_jaxpr(objectives.make_loss_fn(pallas, obj))(params, batch, jax.random.key(2)))
  np.testing.assert_allclose(float(loss_p), float(loss_x), rtol=1e-5)
  for gx, gp in zip(jax.tree.leaves(grads_x), jax.tree.leaves(grads_p)):
    np.testing.assert_allclose(np.asarray(gp), np.asarray(gx), atol=1e-5, rtol=1e-4)
  return jaxpr


def test_model_bd3_loss_and_grads_match_xla_under_mesh():
  _assert_model_bd3_pallas_matches_xla(sharding.DEFAULT_RULES, batch_size=4, num_kv_heads=2)


def test_model_bd3_loss_and_grads_match_xla_under_non_default_rules():
  """The kernels' shard_map follows the config's rules, not fixed mesh axes: batch 2 over data only and 4 heads
  over fsdp×tensor is a valid split under these rules (it is not under the defaults, batch over data×fsdp = 4)."""
  q_spec, kv_spec = attention_lib.kernel_partition_specs(MESH, RULES_HEADS_ON_FSDP)
  assert q_spec == kv_spec == P("data", None, ("fsdp", "tensor"), None)
  jaxpr = _assert_model_bd3_pallas_matches_xla(RULES_HEADS_ON_FSDP, batch_size=2, num_kv_heads=4)
  assert "shard_map" in jaxpr and "'fsdp', 'tensor'" in jaxpr


def test_kernel_specs_reject_rules_the_kernels_cannot_follow():
  seq_parallel = (("batch", "data"), ("length", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"))
  with pytest.raises(NotImplementedError, match="'length' dimension over mesh axes \\('fsdp',\\)"):
    attention_lib.kernel_partition_specs(MESH, seq_parallel)
  split_heads = (("batch", "data"), ("heads", "tensor"), ("kv_heads", None))
  with pytest.raises(ValueError, match="'heads' and 'kv_heads' the same rule"):
    attention_lib.kernel_partition_specs(MESH, split_heads)
  # Without rules in scope the defaults apply (what the model's parameters use).
  assert attention_lib.kernel_partition_specs(MESH) == (X_SPEC, X_SPEC)


def test_tpu_aot_compile_of_pallas_train_step(monkeypatch):
  from ardiff.training import aot
  from configs import default as default_config
  from kernels_pallas import block_sparse_attention as bsa

  calls = []
  real = bsa.block_sparse_attention

  def spy(q, *args, backend=None, interpret=False, **kwargs):
    calls.append((backend, interpret, tuple(sorted(jax.sharding.get_abstract_mesh().manual_axes)), q.shape))
    return real(q, *args, backend=backend, interpret=interpret, **kwargs)

  monkeypatch.setattr(bsa, "block_sparse_attention", spy)
  c = default_config.get_config()
  c.model.attention_impl = "pallas"
  r = aot.compile_train_step(c, "v5e:2x2")
  assert r["chips"] == 4 and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert r["fits"] and 0 < r["per_chip_gib"] < 1
  # The compiled (not interpreted) Mosaic kernels, called per device inside shard_map in the train step.
  assert calls and all(b == "tpu" and i is False for b, i, _, _ in calls)
  assert any(set(manual) >= {"data", "fsdp", "tensor"} for _, _, manual, _ in calls)
