"""Review checks of ``logits_len`` trimming the last layer (ardiff.model) in the paths its own test does not reach:
the rolled TPU/GPU loop, remat policies, bf16 compute, packed segment ids, the Pallas kernels with q_len < kv_len,
and a mesh that shards the length axis. Each compares the trimmed forward (and its gradients) with the full forward
sliced to the same rows."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ardiff import attention as attention_lib
from ardiff import masks, objectives, sharding
from ardiff import model as model_lib
from ardiff.config import ModelConfig
from ardiff.model import Transformer, init_params

CFG = ModelConfig(vocab_size=40, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=48,
                  mask_token_id=39, init_std=0.3)
PARAMS = init_params(CFG, jax.random.key(0))
L, BLOCK = 12, 4  # BD3: [x_t | x_0] of 2L = 24 tokens, the loss on the first L rows
TOKENS = jnp.concatenate([jnp.full((2, L), 39, jnp.int32), jax.random.randint(jax.random.key(1), (2, L), 0, 39)], 1)
SEG = jnp.concatenate([jnp.array([[1] * 8 + [2] * 4, [1] * 12]), jnp.array([[1] * 8 + [2] * 4, [1] * 12])], 1)
POS = jnp.concatenate([jnp.array([list(range(8)) + list(range(4)), list(range(12))])] * 2, 1)
W = jax.random.normal(jax.random.key(3), (2, L, 40))


def _looped(params, n):
  p = {k: v for k, v in params.items() if k != "layers"}
  for i in range(n):
    p[f"layers_{i}"] = jax.tree.map(lambda a: a[i], params["layers"])
  return p


def _value_and_grad(cfg, params, logits_len, segments=True):
  """sum(W * logits[:, :L]) and its gradient, with the forward trimmed (logits_len=L) or full (None) and sliced."""
  model = Transformer(cfg)

  def f(p):
    out = model.apply({"params": p}, TOKENS, mask=masks.BD3(L, BLOCK), positions=POS,
                      segment_ids=SEG if segments else None, logits_len=logits_len)
    assert out.logits.shape[1] == (L if logits_len else 2 * L) and out.hidden.shape[1] == out.logits.shape[1]
    return jnp.sum(W * out.logits[:, :L].astype(jnp.float32))
  return jax.jit(jax.value_and_grad(f))(params)


def _assert_close(a, b, tol):
  (va, ga), (vb, gb) = a, b
  np.testing.assert_allclose(float(va), float(vb), **tol)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=str(path), **tol)


F32 = dict(rtol=2e-4, atol=2e-4)  # f32 sums in a different order (gradients of magnitude ~1)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_trimmed_last_layer_equals_full_forward_under_remat(scan, remat):
  cfg = CFG.replace(scan_layers=scan, remat_policy=remat)
  params = PARAMS if scan else _looped(PARAMS, CFG.num_layers)
  _assert_close(_value_and_grad(cfg, params, L), _value_and_grad(cfg, params, None), F32)


def test_rolled_loop_slices_the_same_rows(monkeypatch):
  """The TPU/GPU branch (a rolled lax.scan, all rows computed then sliced), run here by making it the CPU choice."""
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *args, cpu, default: default(*args))
  rolled = _value_and_grad(CFG, PARAMS, L)
  monkeypatch.undo()
  _assert_close(rolled, _value_and_grad(CFG, PARAMS, None), F32)


def test_bf16_compute_trimmed_is_as_close_to_f32_as_the_full_forward():
  """bf16 rounds differently in the two graphs, so each is measured against the f32 forward: the trimmed one's
  error (values, every gradient) stays within the full one's (measured: at most 1.1x, bf16's own error ~3-10%)."""
  params = _looped(PARAMS, CFG.num_layers)
  v32, g32 = _value_and_grad(CFG.replace(scan_layers=False), params, None)
  cfg = CFG.replace(dtype="bfloat16", scan_layers=False)
  (vt, gt), (vf, gf) = _value_and_grad(cfg, params, L), _value_and_grad(cfg, params, None)
  assert abs(float(vt) - float(v32)) <= 1.25 * abs(float(vf) - float(v32)) + 1e-3
  for (path, r), t, f in zip(jax.tree_util.tree_leaves_with_path(g32), jax.tree.leaves(gt), jax.tree.leaves(gf)):
    r, t, f = (np.asarray(x, np.float32) for x in (r, t, f))
    assert np.abs(t - r).max() <= 1.25 * np.abs(f - r).max() + 1e-3 * np.abs(r).max(), jax.tree_util.keystr(path)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_pallas_last_layer_with_fewer_queries_than_keys(backend):
  """scan_layers=False: the last layer's block-sparse kernel call has q_len = L < kv_len = 2L (packed rows)."""
  cfg = CFG.replace(scan_layers=False, attention_impl="pallas")
  params = _looped(PARAMS, CFG.num_layers)
  ref = Transformer(CFG.replace(scan_layers=False)).apply({"params": params}, TOKENS, mask=masks.BD3(L, BLOCK),
                                                          positions=POS, segment_ids=SEG).logits[:, :L]
  with attention_lib.interpret_mode(backend=backend):
    out = jax.jit(lambda p: Transformer(cfg).apply({"params": p}, TOKENS, mask=masks.BD3(L, BLOCK), positions=POS,
                                                   segment_ids=SEG, logits_len=L).logits)(params)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_length_sharded_mesh_with_a_trimmed_length_the_mesh_does_not_divide():
  """Rules that shard 'length' over 4 devices (XLA attention): the trimmed last layer's rows (6) do not split evenly
  over them, the full 2L = 12 do; values and gradients equal the single-device ones."""
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4)
  rules = (("batch", "data"), ("length", "tensor"), ("embed", None), ("mlp", None), ("heads", None),
           ("kv_heads", None), ("vocab", None), ("head_dim", None), ("layers", None))
  n = 6  # BD3 noisy half of 6 tokens (blocks of 3); 2n = 12 is a multiple of the 4 length shards, 6 is not
  tokens = jnp.concatenate([jnp.full((2, n), 39, jnp.int32), TOKENS[:, L:L + n]], 1)
  model = Transformer(CFG)
  w = W[:, :n]

  def f(p, t):
    out = model.apply({"params": p}, t, mask=masks.BD3(n, 3), logits_len=n)
    return jnp.sum(w * out.logits)
  ref = jax.jit(jax.value_and_grad(f))(PARAMS, tokens)
  ts = jax.device_put(tokens, NamedSharding(mesh, P("data", "tensor")))
  with sharding.activation_sharding(mesh, rules):
    got = jax.jit(jax.value_and_grad(f))(PARAMS, ts)
  _assert_close(got, ref, F32)


def test_bd3_loss_uses_the_trimmed_forward_and_matches_the_full_one(monkeypatch):
  """The BD3 objective (logits_len = L) equals the same objective with the full forward."""
  obj = objectives.ObjectiveConfig(kind="block_diffusion", block_size=BLOCK)
  batch = {"tokens": TOKENS[:, L:], "segment_ids": SEG[:, :L], "positions": POS[:, :L]}
  trimmed = jax.jit(objectives.make_loss_fn(Transformer(CFG), obj))(PARAMS, batch, jax.random.key(5))[0]
  real_call = model_lib.Transformer.__call__
  monkeypatch.setattr(model_lib.Transformer, "__call__",
                      lambda self, *a, logits_len=None, **k: real_call(self, *a, logits_len=None, **k))
  full = jax.jit(objectives.make_loss_fn(Transformer(CFG), obj))(PARAMS, batch, jax.random.key(5))[0]
  np.testing.assert_allclose(float(trimmed), float(full), rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Review finding, fixed: this test failed before its fix (token_nll NaN for a target outside the vocabulary). The
# host_memory findings' tests live in tests/test_host_memory.py.

def test_token_nll_does_not_make_an_out_of_range_target_a_finite_loss():
  from ardiff.objectives import base
  logits = jax.random.normal(jax.random.key(0), (1, 3, 11))
  targets = jnp.array([[1, -1, 11]])  # -1: PyTorch's ignore_index convention; 11 = vocab_size
  nll = jax.jit(lambda x: base.token_nll(x, targets, 10))(logits)
  assert np.isfinite(float(nll[0, 0])) and not np.isfinite(np.asarray(nll[0, 1:])).any(), nll
