"""Training and loading of continuous (ACDiT) image runs: ``python -m ardiff train`` with ``image.kind="continuous"``.

The run directory has the text runs' layout: ``checkpoints/`` (orbax: ``{params, opt_state, step}`` + the grain
iterator + config; resume continues bit-identically), ``metrics.jsonl`` (train loss every ``train.log_every``
steps; ``eval/flow_loss`` on the test split every ``train.eval_every``, with fixed noise so evaluations compare),
``config.json`` and, at the end, ``samples.png`` (one row per class, guided at ``image.cfg_scale``).

Parallelism: data parallel over the ``mesh`` section's ``data`` axis (the text trainer's mesh, :mod:`ardiff.sharding`):
the parameters and optimizer state are replicated, each batch is split over ``data`` (every process reads its own
shard of the split, like the text pipeline) and the gradient is summed across devices by the compiler. The model is
small (about 1M parameters), so ``fsdp`` and ``tensor`` are refused rather than emulated.
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ardiff import sharding as sharding_lib
from ardiff.checkpoints import checkpointer as checkpoint_lib
from ardiff.checkpoints import run_dir as run_dir_lib
from ardiff.images import data as data_lib
from ardiff.images import flow
from ardiff.images import grid as grid_lib
from ardiff.images.discrete import grid_labels
from ardiff.images.model import ACDiT, init_params


class ContinuousTransform:
  """A picklable grain map: record -> ``{"patches": float32[n, p*p] in [-1, 1], "label": int32}``."""

  def __init__(self, *, dataset: str, patch_size: int):
    self.dataset, self.patch_size = dataset, patch_size

  def __call__(self, record):
    unit = data_lib.to_unit(record["image"][None], self.dataset)
    return {"patches": _patchify_np(unit, self.patch_size)[0], "label": np.int32(record["label"])}


def _patchify_np(unit: np.ndarray, p: int) -> np.ndarray:
  """numpy twin of :func:`flow.patchify` (grain workers stay off the accelerator)."""
  b, s, _ = unit.shape
  g = s // p
  return (2.0 * unit.reshape(b, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(b, g * g, p * p) - 1.0).astype(
      np.float32)


def make_optimizer(cfg):
  """AdamW after linear warmup, cosine (to ``end_lr_ratio``) or constant, global-norm clipping: the meaning of the
  ``optimizer`` section (:mod:`ardiff.training.optimizer`), built here because ``ardiff.images`` sits below
  ``ardiff.training`` in the package layering (the trainer hands continuous runs over to this module)."""
  import optax
  peak = cfg.learning_rate
  if cfg.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup_steps, cfg.total_steps,
                                                  end_value=peak * cfg.end_lr_ratio)
  else:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1)),
                                     optax.constant_schedule(peak)], [cfg.warmup_steps])
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


def make_model(exp) -> ACDiT:
  return ACDiT(exp.model, patch_dim=exp.image.patch_size ** 2)


def batches(exp, split: str, batch_size: int, *, seed: int, shuffle: bool, num_epochs=None, shard_index: int = 0,
            shard_count: int = 1):
  """grain iterator of this process's rows (``batch_size // shard_count``) of global batches of ``split``."""
  im = exp.image
  images, labels = data_lib.load_images(im.dataset, split, size=im.size, data_dir=im.data_dir, source=im.source)
  return data_lib.make_dataset(images, labels, ContinuousTransform(dataset=im.dataset, patch_size=im.patch_size),
                               seed=seed, batch_size=batch_size, shuffle=shuffle, num_epochs=num_epochs,
                               shard_index=shard_index, shard_count=shard_count)


def make_mesh(exp, devices=None):
  """``(mesh, replicated, batch_sharding)`` for data-parallel training over the ``mesh`` section (``devices``:
  default all)."""
  from jax.sharding import NamedSharding, PartitionSpec
  mesh = sharding_lib.make_mesh(exp.mesh.data, exp.mesh.fsdp, exp.mesh.tensor, devices=devices)
  if mesh.shape["fsdp"] != 1 or mesh.shape["tensor"] != 1:
    raise NotImplementedError(f"continuous image runs are data parallel only; got mesh fsdp={mesh.shape['fsdp']}, "
                              f"tensor={mesh.shape['tensor']}. Set mesh.fsdp=1 and mesh.tensor=1 (mesh.data=-1 uses "
                              "every device).")
  if exp.train.batch_size % mesh.shape["data"]:
    raise ValueError(f"train.batch_size={exp.train.batch_size} must be divisible by the mesh's data axis "
                     f"({mesh.shape['data']} devices).")
  return mesh, NamedSharding(mesh, PartitionSpec()), sharding_lib.batch_sharding(mesh)


def put_batch(batch, batch_sharding):
  """This process's rows of a batch -> global arrays split over the batch sharding."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, np.asarray(x)), batch)


def _state(exp, model, tx, replicated=None):
  params = init_params(model, jax.random.key(exp.train.seed), exp.image.num_tokens)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  return state if replicated is None else jax.device_put(state, replicated)


def _abstract(state):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def make_step(model, tx, exp):
  import optax
  loss = lambda p, b, r: flow.flow_loss(p, b, r, model=model, block_size=exp.objective.block_size,
                                        label_dropout=exp.image.label_dropout)

  @jax.jit
  def step(state, batch):
    rng = jax.random.fold_in(jax.random.key(exp.train.seed + 1), state["step"])
    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state["params"], batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ok = jnp.isfinite(value) & jnp.isfinite(optax.tree.norm(grads))
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)  # a non-finite update is never applied
    return new, {**metrics, "grad_norm": optax.tree.norm(grads), "nonfinite": ~ok}
  return step


def evaluate(params, model, exp, *, max_batches: int, batch_sharding=None) -> float:
  """Mean flow loss over the test split with fixed noise (comparable across steps and runs); ``batch_sharding``
  splits each batch as in training."""
  fn = jax.jit(lambda p, b, r: flow.flow_loss(p, b, r, model=model, block_size=exp.objective.block_size,
                                              label_dropout=0.0)[0])
  shard = {} if batch_sharding is None else {"shard_index": jax.process_index(), "shard_count": jax.process_count()}
  total, n = 0.0, 0
  for i, batch in enumerate(batches(exp, "test", exp.train.batch_size, seed=0, shuffle=False, num_epochs=1,
                                    **shard)):
    if i >= max_batches:
      break
    batch = batch if batch_sharding is None else put_batch(batch, batch_sharding)
    total += float(fn(params, batch, jax.random.key(1000 + i)))
    n += 1
  if n == 0:
    raise ValueError("the test split is smaller than one batch; lower train.batch_size.")
  return total / n


def train(exp, *, progress: bool = True, stop_after: Optional[int] = None) -> dict:
  tcfg = exp.train
  run_dir = run_dir_lib.as_path(tcfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  model = make_model(exp)
  tx = make_optimizer(exp.optimizer)
  if exp.optimizer.grad_accum_steps != 1 or exp.optimizer.ema_decay:
    raise NotImplementedError("continuous image runs do not implement optimizer.grad_accum_steps > 1 or "
                              "optimizer.ema_decay; set them to 1 and 0.")
  _, replicated, batch_sh = make_mesh(exp)
  state = _state(exp, model, tx, replicated)
  train_iter = iter(batches(exp, "train", tcfg.batch_size, seed=tcfg.seed, shuffle=True,
                            shard_index=jax.process_index(), shard_count=jax.process_count()))
  ckpt = checkpoint_lib.Checkpointer(run_dir / run_dir_lib.CHECKPOINTS, max_to_keep=tcfg.keep_checkpoints,
                                     save_every=tcfg.save_every)
  start = 0
  try:
    if tcfg.resume and ckpt.latest_step() is not None:
      _, state = ckpt.restore(_abstract(state), data_iter=train_iter)
      start = int(state["step"])
      print(f"Resumed from {ckpt.directory} at step {start}.")
    run_dir_lib.write_config(run_dir, exp.raw)
    log = run_dir_lib.MetricsLog(run_dir / run_dir_lib.METRICS_FILE, start)
    step_fn = make_step(model, tx, exp)
    num_steps = tcfg.num_steps if stop_after is None else min(tcfg.num_steps, stop_after)
    last, t0 = {}, time.time()
    save = lambda s, **kw: ckpt.save(s, state, data_iter=train_iter, config_dict=exp.raw.to_dict(), **kw)
    for i in range(start, num_steps):
      state, metrics = step_fn(state, put_batch(next(train_iter), batch_sh))
      done = i + 1
      if bool(metrics["nonfinite"]):
        save(i, force=True)
        ckpt.wait()
        raise FloatingPointError(f"step {done}: non-finite loss or gradient; the update was not applied and the "
                                 f"state before it is saved. Lower optimizer.learning_rate.")
      if done % tcfg.log_every == 0 or done == num_steps:
        last = {k: float(v) for k, v in metrics.items() if k != "nonfinite"}
        last["images_per_s"] = tcfg.batch_size * tcfg.log_every / max(time.time() - t0, 1e-9)
        t0 = time.time()
        log.write({"step": done, **last})
        if progress:
          print(f"step {done}/{tcfg.num_steps}: loss={last['loss']:.4f}", flush=True)
      if done % tcfg.eval_every == 0 or done == tcfg.num_steps:
        ev = evaluate(state["params"], model, exp, max_batches=max(tcfg.eval_batches, 1), batch_sharding=batch_sh)
        log.write({"step": done, "eval/flow_loss": ev})
        last["eval/flow_loss"] = ev
        print(f"step {done}: eval flow loss {ev:.4f}", flush=True)
      save(done)
    if int(state["step"]) != (ckpt.latest_step() or 0):
      save(int(state["step"]), force=True)
    ckpt.wait()
    log.close()
  finally:
    ckpt.close()
  if int(state["step"]) == tcfg.num_steps and tcfg.num_samples > 0:
    print(write_samples(state["params"], model, exp, run_dir))
  return last


def load(run_dir):
  """``(exp, model, params)`` of a continuous image run (latest checkpoint)."""
  from ardiff import experiment as experiment_lib
  config, _ = run_dir_lib.read_config(run_dir)
  exp = experiment_lib.validate(config)
  model = make_model(exp)
  tx = make_optimizer(exp.optimizer)
  ckpt = checkpoint_lib.Checkpointer(run_dir_lib.as_path(run_dir) / run_dir_lib.CHECKPOINTS)
  try:
    _, state = ckpt.restore(_abstract(_state(exp, model, tx)))
  finally:
    ckpt.close()
  if state is None:
    raise FileNotFoundError(f"{run_dir}: no checkpoint to sample from; train it first.")
  return exp, model, state["params"]


def write_samples(params, model, exp, run_dir, *, per_class: Optional[int] = None, rng=None, cfg_scale=None,
                  steps=None, kv_write: str = "fused", out=None) -> str:
  per_class = per_class or exp.train.num_samples
  images = flow.sample_images(params, model, grid_labels(per_class), rng=jax.random.key(0) if rng is None else rng,
                              image=exp.image, block_size=exp.objective.block_size, steps=steps,
                              cfg_scale=cfg_scale, kv_write=kv_write)
  grid = grid_lib.make_grid(images, ncol=per_class, scale=grid_lib.grid_scale(exp.image.side))
  path = grid_lib.write_png(out or run_dir_lib.as_path(run_dir) / "samples.png", grid)
  return f"wrote 10x{per_class} class-conditional samples to {path}"
