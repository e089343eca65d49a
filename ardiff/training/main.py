"""``python -m ardiff train``: the training loop, over importable pieces (Colab users call :func:`train`).

What a run directory holds: ``checkpoints/`` (orbax: state + data iterator + config), ``tb/`` (TensorBoard),
``metrics.jsonl`` (one line per logged step), ``samples.txt`` and ``loss.png`` at the end, ``config.json``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import ml_collections

from ardiff import data as data_lib
from ardiff import experiment as experiment_lib
from ardiff import objectives, sharding
from ardiff.model import Transformer
from ardiff.training import checkpoint as checkpoint_lib
from ardiff.training import evaluate as evaluate_lib
from ardiff.training import optimizer as optimizer_lib
from ardiff.training import train_state as train_state_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "default.py")


def _data_cfg(exp: experiment_lib.Experiment) -> dict:
  d = dict(exp.data)
  d["data_dir"] = os.path.expanduser(d["data_dir"]) if d.get("data_dir") else None
  return d


def _pack_block(exp) -> int:
  return exp.objective.block_size if exp.objective.kind in ("block_diffusion", "tidar") else 0


def make_datasets(exp, *, seed: int):
  block = _pack_block(exp)
  cfg = _data_cfg(exp)
  micro_batch = exp.train["batch_size"] // int(exp.optimizer["grad_accum_steps"])
  train_ds, tok = data_lib.make_dataset(cfg, exp.data["train_split"], seed=seed, batch_size=micro_batch,
                                        seq_len=exp.data["seq_len"], block_size=block)
  if tok.vocab_size > exp.model.vocab_size:
    raise ValueError(f"tokenizer {exp.data['tokenizer']!r} has {tok.vocab_size} ids but model.vocab_size="
                     f"{exp.model.vocab_size}; set model.vocab_size >= {tok.vocab_size}.")
  if exp.objective.kind != "ar" and tok.mask_id is not None and tok.mask_id != exp.model.mask_token_id:
    raise ValueError(f"model.mask_token_id={exp.model.mask_token_id} but the tokenizer's [MASK] id is "
                     f"{tok.mask_id}; set model.mask_token_id={tok.mask_id}.")
  return train_ds, tok


def eval_batches(exp, tok):
  ds, _ = data_lib.make_dataset(_data_cfg(exp), exp.data["eval_split"], seed=0, batch_size=exp.train["batch_size"],
                                seq_len=exp.data["seq_len"], block_size=_pack_block(exp), num_epochs=1,
                                shuffle=False, tokenizer=tok)
  return iter(ds)


def train(config: ml_collections.ConfigDict, *, progress: bool = True, stop_after: Optional[int] = None) -> dict:
  """Trains the experiment ``config`` and returns the final metrics. ``stop_after`` ends the loop early (tests)."""
  exp = experiment_lib.validate(config, devices=jax.devices())
  tcfg = exp.train
  run_dir = os.path.abspath(os.path.expanduser(tcfg["run_dir"]))
  os.makedirs(run_dir, exist_ok=True)
  mesh = sharding.make_mesh(**{a: int(exp.mesh[a]) for a in sharding.MESH_AXES})
  model = Transformer(exp.model)
  train_ds, tok = make_datasets(exp, seed=int(tcfg["seed"]))
  train_iter = iter(train_ds)

  loss_fn = objectives.make_loss_fn(model, exp.objective)
  accum = int(exp.optimizer["grad_accum_steps"])
  tx, lr_schedule = optimizer_lib.make_optimizer(exp.optimizer, total_steps=int(tcfg["num_steps"]))
  ema_decay = float(exp.optimizer["ema_decay"])
  state, state_sh, abstract_state = create_state(model, tx, mesh, exp.rules, seed=int(tcfg["seed"]),
                                                 ema=ema_decay > 0)
  batch_sh = sharding.batch_sharding(mesh)
  step_fn = sharding.under_mesh(train_state_lib.jit_train_step(
      train_state_lib.make_train_step(loss_fn, tx, ema_decay=ema_decay if ema_decay > 0 else None,
                                      lr_schedule=lr_schedule, grad_accum_steps=accum), state_sh, batch_sh),
      mesh, exp.rules)

  ckpt = checkpoint_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), max_to_keep=int(tcfg["keep_checkpoints"]),
                                     save_every=int(tcfg["save_every"]) * accum)
  start = 0
  if tcfg["resume"] and ckpt.latest_step() is not None:
    _, state = ckpt.restore(sharding.with_shardings(abstract_state, state_sh), data_iter=train_iter)
    start = int(jax.device_get(state.step))
    print(f"Resumed from {ckpt.directory} at step {start // accum}.")
  elif tcfg["init_from"]:
    params = load_params(tcfg["init_from"], model, mesh, exp.rules)
    state = jax.jit(lambda p: train_state_lib.TrainState.create(p, tx, jax.random.key(int(tcfg["seed"]) + 1),
                                                                use_ema=ema_decay > 0),
                    out_shardings=state_sh)(params)
    print(f"Initialised parameters from {tcfg['init_from']} (objective now {exp.objective.kind!r}).")
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    f.write(exp.raw.to_json_best_effort(indent=2))

  from tensorboardX import SummaryWriter
  writer = SummaryWriter(os.path.join(run_dir, "tb"))
  metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
  total_steps = int(tcfg["num_steps"])
  num_steps = total_steps if stop_after is None else min(total_steps, stop_after)
  tokens_per_step = tcfg["batch_size"] * exp.data["seq_len"]
  stop = _StopOnSigterm()
  bar = _progress(start // accum, total_steps, enabled=progress)
  eval_fn = sharding.under_mesh(evaluate_lib.make_jitted_eval(model, exp.objective), mesh, exp.rules)
  put = lambda b: data_lib.to_global_batch(b, batch_sh)
  last, t0, last_logged, last_saved = {}, time.time(), start // accum, start
  for micro in range(start, num_steps * accum):
    state, metrics = step_fn(state, put(next(train_iter)))  # one micro-batch; optax.MultiSteps accumulates
    if (micro + 1) % accum:
      continue
    done = (micro + 1) // accum  # optimizer steps
    if done % tcfg["log_every"] == 0 or done == num_steps:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if metrics.get("nonfinite", 0.0):
        ckpt.save(micro, state, data_iter=train_iter, config_dict=exp.raw.to_dict(), force=True)
        ckpt.wait()
        raise train_state_lib.NonFiniteError(
            f"step {done}: non-finite loss or gradient (loss={metrics.get('loss')}); the state before this step is "
            f"saved in {ckpt.directory}. Lower optimizer.learning_rate or check the data.")
      now = time.time()  # throughput over the logging window, so the first window's compile time washes out
      metrics["tokens_per_s"] = tokens_per_step * (done - last_logged) / max(now - t0, 1e-9)
      t0, last_logged = now, done
      for k, v in metrics.items():
        writer.add_scalar(f"train/{k}", v, done)
      metrics_file.write(json.dumps({"step": done, **metrics}) + "\n")
      metrics_file.flush()
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
      last = metrics
    bar.update(1)
    if done % tcfg["eval_every"] == 0 or done == total_steps:
      ev = evaluate_lib.evaluate(state.params, eval_batches(exp, tok), model=model, objective=exp.objective,
                                 rng=jax.random.key(done), max_batches=int(tcfg["eval_batches"]), eval_fn=eval_fn,
                                 put_batch=put, byte_vocab=exp.data["tokenizer"].startswith("byte"))
      for k, v in ev.items():
        writer.add_scalar(f"eval/{k}", v, done)
      metrics_file.write(json.dumps({"step": done, **{f"eval/{k}": v for k, v in ev.items()}}) + "\n")
      bar.write(f"step {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items() if isinstance(v, float)))
      last.update({f"eval/{k}": v for k, v in ev.items()})
    if ckpt.save(micro + 1, state, data_iter=train_iter, config_dict=exp.raw.to_dict()):
      last_saved = micro + 1
    if stop.requested:
      if last_saved != micro + 1:
        ckpt.save(micro + 1, state, data_iter=train_iter, config_dict=exp.raw.to_dict(), force=True)
      ckpt.wait()
      bar.write(f"SIGTERM: saved step {done} in {ckpt.directory}; run the same command again to resume.")
      break
  bar.close()
  final_micro = int(jax.device_get(state.step))
  if last_saved != final_micro:
    ckpt.save(final_micro, state, data_iter=train_iter, config_dict=exp.raw.to_dict(), force=True)
  ckpt.wait()
  stop.restore()
  if final_micro == total_steps * accum and int(tcfg["num_samples"]) > 0:
    text = write_samples(state.params, model, exp, tok, run_dir)
    print(text)
  _plot_loss(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss.png"))
  writer.close()
  metrics_file.close()
  ckpt.close()
  return last


def create_state(model, tx, mesh, rules, *, seed: int, ema: bool):
  """A TrainState created directly in its shardings; returns (state, state shardings, abstract state)."""
  abstract_params, param_sh = sharding.abstract_params_and_shardings(model, mesh, rules)
  params = sharding.init_sharded_params(model, mesh, jax.random.key(seed), rules)
  make = lambda p: train_state_lib.TrainState.create(p, tx, jax.random.key(seed + 1), use_ema=ema)
  abstract_state = jax.eval_shape(make, abstract_params)
  state_sh = train_state_lib.state_shardings(abstract_state, param_sh, mesh)
  state = jax.jit(make, out_shardings=state_sh)(params)
  sharding.assert_params_sufficiently_sharded(state.params, mesh)
  return state, state_sh, abstract_state


class _StopOnSigterm:
  """SIGTERM (preemption, `kill`) asks the loop to save and stop at the next step boundary."""

  def __init__(self):
    import signal
    self.requested = False
    self._signal = signal
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook runners): no handler, nothing to restore
      self._old = None

  def _handle(self, *_):
    self.requested = True

  def restore(self):
    if self._old is not None:
      self._signal.signal(self._signal.SIGTERM, self._old)


def write_samples(params, model, exp, tok, run_dir) -> str:
  """A few generated samples, written to ``samples.txt`` in the run directory."""
  from ardiff.sampling.generate import generate_for_experiment
  texts = generate_for_experiment(params, model, exp, tok, num_samples=int(exp.train["num_samples"]),
                                  num_tokens=int(exp.train["sample_tokens"]), rng=jax.random.key(0))
  body = "\n\n".join(f"--- sample {i} ---\n{t}" for i, t in enumerate(texts))
  with open(os.path.join(run_dir, "samples.txt"), "w") as f:
    f.write(body + "\n")
  return body


def load_params(path: str, model: Transformer, mesh, rules):
  """Parameters for ``train.init_from``, on this mesh: the latest checkpoint of a run directory (``ardiff train``
  or ``ardiff convert``), a checkpoints directory, or a params directory (``ardiff export --to params``). Only
  ``model``'s weight layout must match the source (objective, optimizer and dtype may differ)."""
  from ardiff.export import params as params_lib
  path = os.path.abspath(os.path.expanduser(path))
  if params_lib.is_params_dir(path):
    return params_lib.load_params_dir(path, mesh=mesh, rules=rules, target=model.config)[1]
  ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  source_cfg = os.path.join(os.path.dirname(ckpt_dir), "config.json")
  if os.path.isfile(source_cfg):  # a clear message instead of orbax's shape/structure error
    params_lib.check_compatible(_read_config(os.path.dirname(ckpt_dir))[1], model.config, ckpt_dir)
  abstract, shardings = sharding.abstract_params_and_shardings(model, mesh, rules)
  return restore_params(ckpt_dir, sharding.with_shardings(abstract, shardings))


def restore_params(ckpt_dir: str, target, *, use_ema: bool = False):
  """Only the parameters (or their EMA) of the latest train-state checkpoint, onto ``target``'s shardings; the
  optimizer state is never read, so a checkpoint of another objective or optimizer loads too."""
  import orbax.checkpoint as ocp
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoint directory at {ckpt_dir}; pass a run directory written by `ardiff train`.")
  mngr = ocp.CheckpointManager(ckpt_dir, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{ckpt_dir} holds no finished checkpoint.")
  key = "ema_params" if use_ema else "params"
  item = {key: target}
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  mngr.close()
  if out.state.get(key) is None:
    raise ValueError(f"checkpoint {ckpt_dir}/{step} has no {key!r} (was the run trained with an EMA?).")
  return out.state[key]


def _read_config(run_dir: str):
  """``(ConfigDict, ModelConfig)`` of the ``config.json`` in ``run_dir``."""
  from ardiff.config import ModelConfig
  cfg_path = os.path.join(run_dir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found: {run_dir} is not a run directory written by `ardiff train` "
                            "(or a params directory written by `ardiff export --to params`).")
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.rules)
  return config, ModelConfig.from_dict(config.model.to_dict())


def load_run(run_dir: str, *, use_ema: bool = False):
  """``(experiment, model, params)`` of a run, on a mesh of this host's devices.

  ``run_dir`` is a run directory (latest checkpoint; ``use_ema`` picks the EMA parameters) or a params directory
  of ``ardiff export --to params`` (recognised by its ``model_config.json``; it holds one set of parameters, so
  ``use_ema`` must match how it was exported).
  """
  from ardiff.export import params as params_lib
  run_dir = os.path.abspath(os.path.expanduser(run_dir))
  is_params_dir = params_lib.is_params_dir(run_dir)
  if is_params_dir and not os.path.exists(os.path.join(run_dir, "config.json")):
    raise FileNotFoundError(f"{run_dir}/config.json not found: this params directory carries no experiment config "
                            "(tokenizer, objective, data). Export it from a run with `ardiff export --to params`, "
                            "or read the bare parameters with ardiff.export.params.load_params_dir.")
  config, _ = _read_config(run_dir)
  if is_params_dir:
    params_lib.resolve_tokenizer_path(config, run_dir)  # the exported tokenizer file sits in the directory
  exp = experiment_lib.validate(config)
  mesh = sharding.make_mesh(**{a: int(exp.mesh[a]) for a in sharding.MESH_AXES})
  model = Transformer(exp.model)
  if is_params_dir:
    exported_ema = bool(params_lib.read_meta(run_dir).get("use_ema", False))
    if use_ema and not exported_ema:
      raise ValueError(f"{run_dir} holds the raw parameters, not the EMA; export the EMA with "
                       "`ardiff export --to params --ema` or drop --ema.")
    _, params = params_lib.load_params_dir(run_dir, mesh=mesh, rules=exp.rules, target=exp.model)
    return exp, model, params
  abstract, shardings = sharding.abstract_params_and_shardings(model, mesh, exp.rules)
  params = restore_params(os.path.join(run_dir, "checkpoints"), sharding.with_shardings(abstract, shardings),
                          use_ema=use_ema)
  return exp, model, params


def evaluate_run(run_dir: str, *, max_batches: Optional[int] = None, use_ema: bool = False) -> dict:
  """Evaluates the latest checkpoint of ``run_dir`` with the config saved beside it."""
  exp, model, params = load_run(run_dir, use_ema=use_ema)
  mesh = sharding.make_mesh(**{a: int(exp.mesh[a]) for a in sharding.MESH_AXES})
  tok = data_lib.make_tokenizer(exp.data["tokenizer"])
  put = lambda b: data_lib.to_global_batch(b, sharding.batch_sharding(mesh))
  return evaluate_lib.evaluate(params, eval_batches(exp, tok), model=model, objective=exp.objective,
                               rng=jax.random.key(0), max_batches=max_batches, put_batch=put,
                               byte_vocab=exp.data["tokenizer"].startswith("byte"))


def _progress(start, total, enabled):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def _plot_loss(metrics_path: str, out_path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [json.loads(line) for line in open(metrics_path)]
  train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  evals = [(r["step"], r[k]) for r in rows for k in r if k.startswith("eval/") and k.endswith("_per_token")]
  fig, ax = plt.subplots(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval (nats/token)")
  ax.set_xlabel("step")
  ax.set_ylabel("nats per token")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)


def main(argv) -> int:
  """``python -m ardiff train [--config FILE] [--config.SECTION.KEY=VALUE ...] [--noprogress]``."""
  from ardiff import cli_flags
  parsed = cli_flags.parse(argv, description=__doc__, default_config=DEFAULT_CONFIG,
                           flags=(cli_flags.Flag("progress", True, "show a progress bar", cli_flags.parse_bool),))
  if parsed is None:  # --help
    return 0
  config, flag_values = parsed
  experiment_lib.validate(config)  # bad values fail here, before jax.distributed or any data work
  if os.environ.get("ARDIFF_DISTRIBUTED") == "1":  # set by launch/tpu_vm.sh on every host of a pod
    jax.distributed.initialize()
  train(config, progress=flag_values["progress"] and jax.process_index() == 0)
  return 0
