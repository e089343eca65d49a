"""ACDiT (continuous blockwise AR diffusion): SCAM == BD3's 2L mask, 2-D RoPE against explicit rotations, the
flow loss by hand, whole-image block == a plain DiT, the cached sampler == the uncached training forward at every
step of every block (fused and separate K/V writes, with and without guidance), and CFG at scale 1 == conditional."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks
from ardiff.config import ModelConfig
from ardiff.images import flow
from ardiff.images.model import ACDiT, grid_positions, init_params, rope_2d

pytestmark = pytest.mark.usefixtures("fast_compiles")

CFG = ModelConfig(embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)
N, B, PD = 16, 4, 4  # 4x4 grid of 2x2 patches, blocks of one patch row
# jitted: eager Flax applies dispatch op by op, which costs more than the compiles here
velocity = jax.jit(flow.train_velocity, static_argnames=("model", "block_size", "force_two_stream"))
loss_with_noise = jax.jit(flow.flow_loss_with_noise, static_argnames=("model", "block_size", "force_two_stream"))


def scam(q, k, block, num_blocks):
  """ACDiT's Skip-Causal Attention Mask over [clean blocks 0..T-1 ; noisy blocks T..2T-1], written independently."""
  bq, bk = q // block, k // block
  t = num_blocks
  return (((bq < t) & (bk < t) & (bq >= bk)) | ((bq >= t) & (bk < t) & (bq - t > bk)) | (bq == bk))


@pytest.mark.parametrize("n,block", [(16, 4), (16, 1), (16, 16), (12, 3)])
def test_scam_is_bd3_with_halves_swapped(n, block):
  idx = np.arange(2 * n)
  swap = np.where(idx < n, idx + n, idx - n)  # position in [noisy ; clean] of each [clean ; noisy] index
  ours = masks.BD3(n, block).dense(2 * n, 2 * n)[np.ix_(swap, swap)]
  np.testing.assert_array_equal(ours, scam(idx[:, None], idx[None, :], block, n // block))


def test_rope_2d_matches_explicit_rotations():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  rows, cols = rng.integers(0, 7, (2, 5)), rng.integers(0, 7, (2, 5))
  got = np.asarray(rope_2d(jnp.asarray(x), jnp.asarray(rows), jnp.asarray(cols), 100.0))
  want = np.empty_like(x)
  for b in range(2):
    for i in range(5):
      for half, pos in ((0, rows[b, i]), (1, cols[b, i])):
        seg = x[b, i, :, 4 * half:4 * half + 4].astype(np.float64)  # pairs (j, j + 2) inside each half
        out = seg.copy()
        for j in range(2):
          ang = pos / 100.0 ** (2 * j / 4)
          c, s = np.cos(ang), np.sin(ang)
          out[:, j] = c * seg[:, j] - s * seg[:, j + 2]
          out[:, j + 2] = s * seg[:, j] + c * seg[:, j + 2]
        want[b, i, :, 4 * half:4 * half + 4] = out
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def fresh():
  model = ACDiT(CFG, patch_dim=PD)
  return model, init_params(model, jax.random.key(0), N)


@jax.jit
def _perturb(params):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return tree.unflatten([p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def model_params(fresh):
  # the zero-initialised adaLN and output layers would make every velocity 0: perturb every leaf
  return fresh[0], _perturb(fresh[1])


def _batch(b=3):
  x = jax.random.uniform(jax.random.key(2), (b, N, PD), minval=-1, maxval=1)
  return {"patches": x, "label": jnp.arange(b, dtype=jnp.int32) % 10}


def test_flow_loss_by_hand_at_init(fresh):
  model, params = fresh  # adaLN-Zero: the fresh model predicts velocity 0
  batch = _batch()
  noise = flow.sample_noise(jax.random.key(3), batch["patches"].shape, B, 0.5)
  loss = loss_with_noise(params, batch, noise, model=model, block_size=B)
  x, eps = np.asarray(batch["patches"], np.float64), np.asarray(noise.eps, np.float64)
  np.testing.assert_allclose(float(loss), np.mean((x - eps) ** 2), rtol=1e-6)


def test_flow_loss_by_hand(model_params):
  model, params = model_params
  batch = _batch()
  noise = flow.sample_noise(jax.random.key(3), batch["patches"].shape, B, 0.5)
  x, eps = np.asarray(batch["patches"]), np.asarray(noise.eps)
  t = np.repeat(np.asarray(noise.t_blocks), B, axis=1)[..., None]
  x_t = t * x + (1 - t) * eps
  labels = np.where(np.asarray(noise.drop), 10, np.asarray(batch["label"]))
  rows, cols = grid_positions(N, 3)
  apply = jax.jit(lambda *a: model.apply({"params": params}, *a, rows=jnp.concatenate([rows, rows], 1),
                                          cols=jnp.concatenate([cols, cols], 1), mask=masks.BD3(N, B)).velocity)
  out = apply(np.concatenate([x_t, x], 1), np.concatenate([t[..., 0], np.ones_like(t[..., 0])], 1), labels)[:, :N]
  want = np.mean((np.asarray(out, np.float64) - (x - eps)) ** 2)
  got = loss_with_noise(params, batch, noise, model=model, block_size=B)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_whole_image_block_is_a_plain_dit(model_params):
  model, params = model_params
  batch = _batch()
  noise = flow.sample_noise(jax.random.key(4), batch["patches"].shape, N, 0.0)
  x_t, t, _ = flow.noisy_inputs(batch["patches"], noise.eps, noise.t_blocks, N)
  one = velocity(params, model, x_t, t, batch["patches"], batch["label"], block_size=N)
  two = velocity(params, model, x_t, t, batch["patches"], batch["label"], block_size=N,
                            force_two_stream=True)
  np.testing.assert_allclose(np.asarray(one), np.asarray(two), rtol=2e-5, atol=2e-5)


def _reference_velocity(params, model, clean, x_s, blk, t_s, labels):
  """The training forward: block blk noisy (= x_s at time t_s), clean copy = the sampled clean blocks."""
  b = clean.shape[0]
  x_t = jnp.zeros_like(clean).at[:, blk * B:(blk + 1) * B].set(x_s)
  t = jnp.full((b, N), 0.3).at[:, blk * B:(blk + 1) * B].set(t_s)
  v = velocity(params, model, x_t, t, clean, labels, block_size=B)
  return v[:, blk * B:(blk + 1) * B]


@pytest.mark.parametrize("kv_write,scale", [("fused", 1.0), ("separate", 1.0), ("fused", 2.5)])
def test_cached_sampler_equals_uncached_forward(model_params, kv_write, scale):
  model, params = model_params
  labels = jnp.array([1, 7], jnp.int32)
  steps, rng = 2, jax.random.key(5)
  out, vel = flow.sample(params, model, labels, rng=rng, num_patches=N, block_size=B, steps=steps,
                         cfg_scale=scale, kv_write=kv_write, return_blocks=True)
  for blk in range(N // B):
    x = jax.random.normal(jax.random.fold_in(rng, blk), (2, B, PD))
    for s in range(steps):
      ref = _reference_velocity(params, model, out, x, blk, s / steps, labels)
      if scale != 1.0:
        null = _reference_velocity(params, model, out, x, blk, s / steps, jnp.full_like(labels, 10))
        ref = null + scale * (ref - null)
      np.testing.assert_allclose(np.asarray(vel[blk][s]), np.asarray(ref), rtol=1e-4, atol=1e-4)
      x = x + vel[blk][s] / steps
    np.testing.assert_allclose(np.asarray(out[:, blk * B:(blk + 1) * B]), np.asarray(x), rtol=1e-6, atol=1e-6)


def test_cfg_scale_one_is_the_conditional_model(model_params):
  model, params = model_params
  labels = jnp.array([3, 4], jnp.int32)
  kw = dict(rng=jax.random.key(6), num_patches=N, block_size=B, steps=2)
  plain = flow.sample(params, model, labels, cfg_scale=1.0, **kw)
  # the guided path (cond and null halves in one batch) at a scale that reduces to the conditional velocity
  guided = flow.sample(params, model, labels, cfg_scale=1.0 + 1e-12, **kw)
  np.testing.assert_allclose(np.asarray(plain), np.asarray(guided), rtol=1e-5, atol=1e-5)
  again = flow.sample(params, model, labels, cfg_scale=1.0, **kw)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(again))  # deterministic under the seed


def test_patchify_round_trip():
  img = jax.random.uniform(jax.random.key(7), (2, 8, 8))
  p = flow.patchify(img, 2)
  assert p.shape == (2, 16, 4)
  np.testing.assert_allclose(np.asarray(p[0, 1]), 2 * np.asarray(img[0, 0:2, 2:4]).reshape(-1) - 1, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(flow.unpatchify(p, 2)), np.asarray(img), rtol=1e-6, atol=1e-6)


def test_data_parallel_step_equals_single_device():
  """Two training steps with the batch split over 8 devices (mesh data=8) give the single-device losses, gradient
  norms and parameters: the same global batch and noise, only the gradient's reduction order differs."""
  from ardiff import experiment
  from ardiff.images import acdit_train
  from configs import fashion_acdit

  c = fashion_acdit.get_config("dataset=digits")
  c.model.embed_dim, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 32, 1, 2, 2
  c.model.head_dim, c.model.mlp_dim, c.train.batch_size = 16, 64, 16
  exp = experiment.validate(c)
  model, tx = acdit_train.make_model(exp), acdit_train.make_optimizer(exp.optimizer)
  it = iter(acdit_train.batches(exp, "train", 16, seed=0, shuffle=True))
  host_batches = [next(it) for _ in range(2)]
  state0, results = acdit_train._state(exp, model, tx), []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh, replicated, batch_sh = acdit_train.make_mesh(exp, devices=devices)
    assert mesh.shape["data"] == len(devices)
    state, step = jax.device_put(state0, replicated), acdit_train.make_step(model, tx, exp)
    metrics = []
    for b in host_batches:
      batch = acdit_train.put_batch(b, batch_sh)
      assert len(batch["patches"].sharding.device_set) == len(devices)
      state, m = step(state, batch)
      metrics.append((float(m["loss"]), float(m["grad_norm"])))
    results.append((metrics, jax.device_get(state["params"])))
  (m1, p1), (m8, p8) = results
  np.testing.assert_allclose(m8, m1, rtol=2e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p8, p1)
  c.mesh.fsdp = 2
  with pytest.raises(NotImplementedError, match="data parallel only"):
    acdit_train.make_mesh(experiment.validate(c))
