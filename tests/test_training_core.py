"""Train step (loss goes down, NaN guard, grad accumulation, EMA) and checkpoint save/restore across meshes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ardiff import sharding
from ardiff.training import (Checkpointer, NonFiniteError, OptimizerConfig, TrainState, jit_train_step,
                             make_optimizer, make_train_step, raise_if_nonfinite, state_shardings)


def _quad_loss(params, batch, rng):
  """Linear regression; the mean is over examples, so micro-batch means average to the big-batch mean."""
  del rng
  pred = batch["x"] @ params["w"] + params["b"]
  loss = jnp.mean((pred - batch["y"]) ** 2)
  return loss, {"mse": loss}


def _data(n=16, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (n, 8))
  w_true = jax.random.normal(k2, (8, 4))
  return {"x": x, "y": x @ w_true}


def _params():
  return {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))}


def test_loss_decreases_and_metrics():
  tx, sched = make_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=2, total_steps=50, weight_decay=0.0))
  state = TrainState.create(_params(), tx, jax.random.key(0), use_ema=True)
  step = jax.jit(make_train_step(_quad_loss, tx, ema_decay=0.9, lr_schedule=sched))
  batch = _data()
  losses = []
  for _ in range(30):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    assert int(m["nonfinite"]) == 0
  assert losses[-1] < 0.2 * losses[0]
  assert int(state.step) == 30
  assert set(m) >= {"loss", "grad_norm", "lr", "nonfinite", "mse"}
  np.testing.assert_allclose(float(m["lr"]), float(sched(29)), rtol=1e-5)
  # EMA moved but lags the params
  assert float(jnp.abs(state.ema_params["w"]).sum()) > 0
  assert not np.allclose(state.ema_params["w"], state.params["w"])


def test_schedules():
  _, cos = make_optimizer({"learning_rate": 1.0, "warmup_steps": 10, "total_steps": 110, "end_lr_ratio": 0.1})
  assert float(cos(0)) == 0.0 and abs(float(cos(10)) - 1.0) < 1e-6 and abs(float(cos(110)) - 0.1) < 1e-6
  _, const = make_optimizer({"schedule": "constant", "learning_rate": 0.5, "warmup_steps": 4})
  assert abs(float(const(2)) - 0.25) < 1e-6 and float(const(1000)) == 0.5
  # the experiment config's optimizer section (has ema_decay, no total_steps) + an explicit total_steps
  section = dict(learning_rate=3e-3, schedule="cosine", warmup_steps=50, b1=0.9, b2=0.99, eps=1e-8,
                 weight_decay=0.01, clip_norm=1.0, end_lr_ratio=0.1, grad_accum_steps=1, ema_decay=0.0)
  _, s2 = make_optimizer(section, total_steps=600)
  assert abs(float(s2(600)) - 3e-4) < 1e-8
  with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
    make_optimizer({"learning_rat": 1.0})


def test_nan_guard_keeps_old_state():
  tx, _ = make_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=0, total_steps=10))
  state = TrainState.create(_params(), tx, jax.random.key(0), use_ema=True)
  good = jax.jit(make_train_step(_quad_loss, tx, ema_decay=0.9))
  state, _ = good(state, _data())

  def nan_loss(params, batch, rng):
    loss, aux = _quad_loss(params, batch, rng)
    return loss * jnp.nan, aux

  bad = jax.jit(make_train_step(nan_loss, tx, ema_decay=0.9))
  new, m = bad(state, _data())
  assert int(m["nonfinite"]) == 1
  with pytest.raises(NonFiniteError, match="Non-finite loss or gradient at step 1"):
    raise_if_nonfinite(m, state.step)
  raise_if_nonfinite({"nonfinite": 0}, 0)
  for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, (new.step, new.params, new.opt_state, new.ema_params))),
                  jax.tree.leaves(jax.tree.map(np.asarray, (state.step, state.params, state.opt_state,
                                                            state.ema_params)))):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.random.key_data(new.rng), jax.random.key_data(state.rng))

  # an Inf gradient (finite loss) is caught too
  def inf_grad_loss(params, batch, rng):
    loss, aux = _quad_loss(params, batch, rng)
    return loss + 0.0 * jnp.sqrt(params["b"][0] * 0.0 - 0.0), aux  # d sqrt(x)/dx at 0 = inf

  new2, m2 = jax.jit(make_train_step(inf_grad_loss, tx, ema_decay=0.9))(state, _data())
  assert int(m2["nonfinite"]) == 1
  np.testing.assert_array_equal(np.asarray(new2.params["w"]), np.asarray(state.params["w"]))


def test_nan_guard_checks_the_updated_params():
  """A NaN learning rate: loss and gradients are finite, the updated parameters are not; the update is refused."""
  tx = optax.sgd(float("nan"))
  state = TrainState.create(_params(), tx, jax.random.key(0))
  new, m = jax.jit(make_train_step(_quad_loss, tx))(state, _data())
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert int(m["nonfinite"]) == 1
  assert int(new.step) == 0
  np.testing.assert_array_equal(np.asarray(new.params["w"]), np.asarray(state.params["w"]))


def test_grad_accumulation_equals_big_batch():
  k = 4
  base = dict(learning_rate=0.05, warmup_steps=0, total_steps=100, weight_decay=0.01, clip_norm=1.0)
  tx_big, _ = make_optimizer(OptimizerConfig(**base))
  tx_acc, _ = make_optimizer(OptimizerConfig(**base, grad_accum_steps=k))
  data = _data(n=16)
  micro = [jax.tree.map(lambda x, i=i: x[i * 4:(i + 1) * 4], data) for i in range(k)]

  s_big = TrainState.create(_params(), tx_big, jax.random.key(0), use_ema=True)
  s_acc = TrainState.create(_params(), tx_acc, jax.random.key(0), use_ema=True)
  step_big = jax.jit(make_train_step(_quad_loss, tx_big, ema_decay=0.5))
  step_acc = jax.jit(make_train_step(_quad_loss, tx_acc, ema_decay=0.5))
  for _ in range(2):  # two optimizer updates
    s_big, _ = step_big(s_big, data)
    for i, mb in enumerate(micro):
      before = s_acc.params["w"]
      s_acc, _ = step_acc(s_acc, mb)
      if i < k - 1:  # no update until the k-th micro-step
        np.testing.assert_array_equal(np.asarray(before), np.asarray(s_acc.params["w"]))
  for a, b in zip(jax.tree.leaves((s_big.params, s_big.ema_params)), jax.tree.leaves((s_acc.params,
                                                                                     s_acc.ema_params))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_sharded_model_train_step_reduces_loss():
  """Tiny block-diffusion LM on a (2, 2, 2) mesh through jit_train_step (donated, sharded state)."""
  from ardiff.config import ModelConfig
  from ardiff.model import Transformer
  from ardiff.objectives import ObjectiveConfig, make_loss_fn
  cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=64, mask_token_id=63)
  model = Transformer(cfg)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  b, l = 8, 16
  sharding.check_divisibility(cfg, dict(mesh.shape))
  ex = jnp.zeros((2, l), jnp.int32)
  abstract_p, psh = sharding.abstract_params_and_shardings(model, mesh, example_tokens=ex)
  params = sharding.init_sharded_params(model, mesh, jax.random.key(0), example_tokens=ex)
  tx, sched = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=20, weight_decay=0.0))
  create = lambda p: TrainState.create(p, tx, jax.random.key(1), use_ema=True)
  ssh = state_shardings(jax.eval_shape(create, abstract_p), psh, mesh)
  state = jax.jit(create, out_shardings=ssh)(params)
  loss_fn = make_loss_fn(model, ObjectiveConfig(kind="block_diffusion", block_size=4))
  step = jit_train_step(make_train_step(loss_fn, tx, ema_decay=0.99, lr_schedule=sched), ssh,
                        sharding.batch_sharding(mesh))
  tokens = jax.random.randint(jax.random.key(2), (b, l), 0, 8, dtype=jnp.int32)
  batch = {"tokens": tokens, "segment_ids": jnp.ones((b, l), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)),
           "loss_mask": jnp.ones((b, l), jnp.int32)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  losses = []
  for _ in range(8):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
    assert int(m["nonfinite"]) == 0
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  sharding.assert_params_sufficiently_sharded(state.params, mesh, min_fraction=0.9)
  sharding.assert_params_sufficiently_sharded(state.opt_state, mesh, min_fraction=0.9)


# ----------------------------------------------------------------------------------------------- checkpoints
def _sharded_state(mesh, tx, materialize=True):
  """A TrainState over a 2-D param tree sharded (fsdp, tensor); abstract + shardings + (optional) concrete."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  params = {"w": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32) / 100.0, "b": jnp.ones((32,))}
  psh = {"w": NamedSharding(mesh, P("fsdp", "tensor")), "b": NamedSharding(mesh, P("tensor"))}
  create = lambda p: TrainState.create(p, tx, jax.random.key(3), use_ema=True)
  abstract = jax.eval_shape(create, params)
  ssh = state_shardings(abstract, psh, mesh)
  target = sharding.with_shardings(abstract, ssh)
  state = jax.jit(create, out_shardings=ssh)(params) if materialize else None
  return target, ssh, state


def _assert_tree_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def saved_ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp("ckpt")
  tx, _ = make_optimizer(OptimizerConfig(learning_rate=0.01, warmup_steps=0, total_steps=10, weight_decay=0.0))
  mesh8 = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  _, ssh, state = _sharded_state(mesh8, tx)
  assert len(state.params["w"].sharding.device_set) == 8 and not state.params["w"].sharding.is_fully_replicated
  step = jax.jit(make_train_step(lambda p, b, r: (jnp.sum(p["w"] ** 2) + jnp.sum(p["b"]), {}), tx, ema_decay=0.9))
  states = {}
  ck = Checkpointer(str(d), max_to_keep=3, save_every=1, async_save=True)
  for s in (1, 2):
    state, _ = step(state, None)
    states[s] = jax.tree.map(np.asarray, jax.tree.map(
        lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, state))
    assert ck.save(s, state, config_dict={"step": s, "name": "toy"})
  ck.close()
  return str(d), tx, states


def _plain(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                      else x, tree)


@pytest.mark.parametrize("shape,ndev", [((1, 4, 1), 4), ((1, 2, 2), 4), ((1, 1, 1), 1)])
def test_restore_on_other_mesh(saved_ckpt, shape, ndev):
  d, tx, states = saved_ckpt
  mesh = sharding.make_mesh(*shape, devices=jax.devices()[:ndev])
  target, ssh, _ = _sharded_state(mesh, tx, materialize=False)
  with Checkpointer(d, max_to_keep=3, save_every=1) as ck:
    step, state, cfg = ck.restore(target, with_config=True)
  assert step == 2 and cfg == {"step": 2, "name": "toy"}
  assert len(state.params["w"].sharding.device_set) == ndev
  assert state.params["w"].sharding.is_equivalent_to(ssh.params["w"], 2)
  _assert_tree_equal(_plain(state), states[2])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax async thread after a failed read
def test_corrupt_latest_falls_back(saved_ckpt, tmp_path):
  import shutil
  d, tx, states = saved_ckpt
  d2 = str(tmp_path / "copy")
  shutil.copytree(d, d2)
  target, _, _ = _sharded_state(sharding.make_mesh(1, 4, 1, devices=jax.devices()[:4]), tx, materialize=False)
  # truncate every data file of the latest step (and keep names): a damaged finalized checkpoint
  root = os.path.join(d2, "2", "state")
  for dirpath, _, files in os.walk(os.path.join(root, "d")):
    for f in files:
      with open(os.path.join(dirpath, f), "r+b") as fh:
        fh.truncate(3)
  with Checkpointer(d2, max_to_keep=3, save_every=1) as ck:
    with pytest.warns(RuntimeWarning, match="step 2 .*corrupt"):
      step, state = ck.restore(target)
  assert step == 1
  _assert_tree_equal(_plain(state), states[1])

  # a missing file in the latest step is detected as well
  d3 = str(tmp_path / "copy3")
  shutil.copytree(d, d3)
  os.remove(os.path.join(d3, "2", "state", "manifest.ocdbt"))
  with Checkpointer(d3, max_to_keep=3, save_every=1) as ck:
    with pytest.warns(RuntimeWarning, match="falling back"):
      step, _ = ck.restore(target)
  assert step == 1


def test_restore_empty_dir(tmp_path):
  with Checkpointer(str(tmp_path / "none")) as ck:
    assert ck.restore({"a": jax.ShapeDtypeStruct((2,), jnp.float32)}) == (None, None)


def test_data_iterator_config_and_interval(tmp_path):
  import grain
  ds = grain.MapDataset.range(20).to_iter_dataset()
  it = iter(ds)
  seen = [next(it) for _ in range(3)]
  assert seen == [0, 1, 2]
  state = {"w": jnp.arange(4.0)}
  with Checkpointer(str(tmp_path / "c"), max_to_keep=2, save_every=2, **{"async": True}) as ck:
    assert ck.save(2, state, data_iter=it, config_dict={"lr": 0.1})
    assert not ck.save(3, state, data_iter=it)  # off-interval: skipped
    assert ck.save(3, state, data_iter=it, force=True)
    ck.wait()
    assert ck.all_steps() == [2, 3]
  fresh = iter(ds)
  with Checkpointer(str(tmp_path / "c"), max_to_keep=2, save_every=2) as ck:
    step, restored = ck.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, data_iter=fresh)
  assert step == 3 and next(fresh) == 3
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
