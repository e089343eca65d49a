"""``python -m ardiff train``: the training loop, over importable pieces (Colab users call :func:`train`).

What a run directory holds: ``checkpoints/`` (orbax: state + data iterator + config), ``tb/`` (TensorBoard),
``metrics.jsonl`` (one line per logged step), ``samples.txt`` and ``loss.png`` at the end, ``config.json``; its
format is read and written in :mod:`ardiff.checkpoints.run_dir`. Faults: SIGTERM saves the current step once and exits
0; a corrupt latest checkpoint is moved aside and the previous one resumed, with ``metrics.jsonl`` and TensorBoard
rewound to it; a non-finite update is refused and the last good state saved.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from typing import Optional

import jax
import ml_collections

from ardiff import data as data_lib
from ardiff import distributed
from ardiff import experiment as experiment_lib
from ardiff import objectives, sharding
from ardiff.data import pipeline as pipeline_lib
from ardiff.checkpoints import checkpointer as checkpoint_lib
from ardiff.checkpoints import params_dir as params_lib
from ardiff.checkpoints import run_dir as run_dir_lib
from ardiff.model import Transformer
from ardiff.training import clip_search as clip_search_lib
from ardiff.training import evaluate as evaluate_lib
from ardiff.training import optimizer as optimizer_lib
from ardiff.training import train_state as train_state_lib
# The run-directory readers live in ardiff/checkpoints/run_dir.py; re-exported because README/Colab call them from
# here.
from ardiff.checkpoints.run_dir import load_params, load_run, read_config, restore_params  # noqa: F401

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "default.py")


def _data_cfg(exp: experiment_lib.Experiment) -> experiment_lib.DataConfig:
  return exp.data.replace(data_dir=os.path.expanduser(exp.data.data_dir))


def _pack_block(exp) -> int:
  return exp.objective.block_size if exp.objective.kind in ("block_diffusion", "tidar") else 0


def make_datasets(exp, batch_sh, *, seed: int):
  """This process's training batches (:class:`ardiff.data.pipeline.ShardedBatches`: its data shards of every
  global micro-batch placed with ``batch_sh``) and the tokenizer."""
  if exp.image is not None:  # discrete image runs: ardiff/images, docs/images.md
    from ardiff.images import discrete
    return discrete.make_datasets(exp, batch_sh, seed=seed)
  micro_batch = exp.train.batch_size // exp.optimizer.grad_accum_steps
  train_ds, tok = pipeline_lib.make_sharded_batches(
      _data_cfg(exp), exp.data.train_split, sharding=batch_sh, batch_size=micro_batch, seed=seed,
      seq_len=exp.data.seq_len, block_size=_pack_block(exp))
  if tok.vocab_size > exp.model.vocab_size:
    raise ValueError(f"tokenizer {exp.data.tokenizer!r} has {tok.vocab_size} ids but model.vocab_size="
                     f"{exp.model.vocab_size}; set model.vocab_size >= {tok.vocab_size}.")
  if exp.objective.kind != "ar" and tok.mask_id is not None and tok.mask_id != exp.model.mask_token_id:
    raise ValueError(f"model.mask_token_id={exp.model.mask_token_id} but the tokenizer's [MASK] id is "
                     f"{tok.mask_id}; set model.mask_token_id={tok.mask_id}.")
  return train_ds, tok


def eval_batches(exp, tok, batch_sh):
  """One pass over the evaluation split: this process's data shards of each global batch (see make_datasets)."""
  if exp.image is not None:
    from ardiff.images import discrete
    return discrete.eval_batches(exp, batch_sh)
  ds, _ = pipeline_lib.make_sharded_batches(
      _data_cfg(exp), exp.data.eval_split, sharding=batch_sh, batch_size=exp.train.batch_size, seed=0,
      seq_len=exp.data.seq_len, block_size=_pack_block(exp), num_epochs=1, shuffle=False, tokenizer=tok)
  return ds


def eval_token_bytes(exp, tok):
  """Each token id's UTF-8 bytes, for evaluation's bits per byte (None for image runs, whose ids are pixels, and for
  tokenizers without a per-id byte count)."""
  return None if exp.image is not None else data_lib.token_byte_lengths(tok)


def train(config: ml_collections.ConfigDict, *, progress: bool = True, stop_after: Optional[int] = None) -> dict:
  """Trains the experiment ``config`` and returns the final metrics. ``stop_after`` ends the loop early (tests).

  Everything it opens (TensorBoard writer, ``metrics.jsonl``, checkpointer, SIGTERM handler) is released when it
  returns or raises, so a failed call in a notebook leaves nothing behind.
  """
  exp = experiment_lib.validate(config, devices=jax.devices())
  if exp.image is not None and exp.image.kind == "continuous":  # ACDiT image runs: ardiff/images, docs/images.md
    from ardiff.images import acdit_train
    return acdit_train.train(exp, progress=progress, stop_after=stop_after)
  run_dir = run_dir_lib.as_path(exp.train.run_dir)  # a local path or a URL (gs://...), never abspath'ed
  check_start(exp, run_dir)
  if distributed.is_main():  # one writer of the run directory's own files; orbax coordinates checkpoints
    run_dir.mkdir(parents=True, exist_ok=True)
  try:
    with contextlib.ExitStack() as cleanup:
      return _train(exp, run_dir, cleanup, progress=progress, stop_after=stop_after)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    raise PeerFailure(f"process {jax.process_index()} of {jax.process_count()}: a collective failed ("
                      f"{' '.join(str(e).split())[:200]}); another process of this run most likely died or lost "
                      "its network. Stop every process and run the same command again on all of them: training "
                      "resumes from the last checkpoint.") from e


def check_start(exp, run_dir) -> None:
  """What would make the run fail after writing into ``run_dir``, checked before anything is written: the run
  directory is a file, a fresh run (``train.resume=False``) over a run's checkpoints, a resumed run whose model no
  longer fits its checkpoints, a missing ``train.init_from``."""
  tcfg = exp.train
  if run_dir.exists() and not run_dir.is_dir():
    raise ValueError(f"train.run_dir={tcfg.run_dir} is a file, not a directory; pick another train.run_dir.")
  ckpt_dir = run_dir / run_dir_lib.CHECKPOINTS
  steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []
  if steps and not tcfg.resume:
    raise ValueError(f"train.run_dir={tcfg.run_dir} holds a run's checkpoints (latest step {steps[-1]}), and "
                     "train.resume=False would start over on top of them, replacing its config.json and "
                     "metrics. Pick a new train.run_dir, delete that directory, or drop train.resume=False to "
                     "continue it.")
  stored = None
  if steps and (run_dir / run_dir_lib.CONFIG_FILE).exists():
    try:
      stored = run_dir_lib.read_config(run_dir)[1]
    except ValueError:  # a damaged config.json: the resume restores from the checkpoint and rewrites it
      pass
  if stored is not None:
    try:
      params_lib.check_compatible(stored, exp.model, str(run_dir))
    except ValueError as e:
      raise ValueError(f"train.run_dir={tcfg.run_dir} holds checkpoints of another model, so this run cannot "
                       f"resume there: {e} Pick a new train.run_dir to train this model.") from None
  if tcfg.init_from and not steps and not run_dir_lib.as_path(tcfg.init_from).exists():
    raise FileNotFoundError(f"train.init_from={tcfg.init_from} does not exist; pass a run directory (ardiff train or "
                            "ardiff convert), its checkpoints directory, or a params directory (ardiff export "
                            "--to params), or set train.init_from='' to train from scratch.")


class PeerFailure(RuntimeError):
  """A cross-process computation failed under several processes: another process died or is unreachable."""


def _train(exp, run_dir, cleanup: contextlib.ExitStack, *, progress: bool, stop_after: Optional[int]) -> dict:
  tcfg = exp.train
  mesh = sharding.make_mesh(exp)
  model = Transformer(exp.model)
  batch_sh = sharding.batch_sharding(mesh)
  train_iter, tok = make_datasets(exp, batch_sh, seed=tcfg.seed)
  token_bytes = eval_token_bytes(exp, tok)
  main_process = distributed.is_main()
  say = print if main_process else (lambda *a, **k: None)  # only process 0 talks and writes logs

  loss_fn = objectives.make_loss_fn(model, exp.objective)
  accum = exp.optimizer.grad_accum_steps
  tx, lr_schedule = optimizer_lib.make_optimizer(exp.optimizer)
  ema_decay = exp.optimizer.ema_decay
  clip = clip_search_lib.initial_clip(exp.objective)  # None unless objective.clip_search moves the interval
  state, state_sh, abstract_state = create_state(model, tx, mesh, exp.rules, seed=tcfg.seed,
                                                 ema=ema_decay > 0, clip=clip)
  # aligned: processes enter the first step together however long each one's compile took (distributed.aligned)
  step_fn = sharding.under_mesh(distributed.aligned(train_state_lib.jit_train_step(
      train_state_lib.make_train_step(loss_fn, tx, ema_decay=ema_decay if ema_decay > 0 else None,
                                      lr_schedule=lr_schedule, grad_accum_steps=accum), state_sh, batch_sh),
                                                    "train_step"), mesh, exp.rules)

  ckpt = checkpoint_lib.Checkpointer(run_dir / run_dir_lib.CHECKPOINTS, max_to_keep=tcfg.keep_checkpoints,
                                     save_every=tcfg.save_every * accum)
  cleanup.callback(ckpt.close)  # waits for an in-flight save, also when the loop raises
  # start: the micro-step training starts from; last_saved: the micro-step whose state is on disk (the restored
  # one, or none yet: a fresh run saves step 0 if its first update is refused)
  start, last_saved = 0, None
  if tcfg.resume and ckpt.latest_step() is not None:
    clip_search_lib.check_resume(run_dir, exp.objective)  # before write_config replaces config.json below
    try:  # a corrupt latest step is moved aside and the previous one restored (checkpoint.restore_latest)
      _, state = ckpt.restore(sharding.with_shardings(abstract_state, state_sh), data_iter=train_iter)
      start = last_saved = int(jax.device_get(state.step))
      say(f"Resumed from {ckpt.directory} at step {start // accum}.")
    except checkpoint_lib.NoCheckpointError as e:  # every step was corrupt (all moved aside): start over
      say(f"{e} Training from step 0.")
      state, _, _ = create_state(model, tx, mesh, exp.rules, seed=tcfg.seed, ema=ema_decay > 0, clip=clip)
      train_iter, _ = make_datasets(exp, batch_sh, seed=tcfg.seed)
  elif tcfg.init_from:
    params = run_dir_lib.load_params(tcfg.init_from, model, mesh, exp.rules)
    state = jax.jit(lambda p: train_state_lib.TrainState.create(p, tx, jax.random.key(tcfg.seed + 1),
                                                                use_ema=ema_decay > 0, clip=clip),
                    out_shardings=state_sh)(params)
    say(f"Initialised parameters from {tcfg.init_from} (objective now {exp.objective.kind!r}).")
  if main_process:
    run_dir_lib.write_config(run_dir, exp.raw)

  # Records after the restored step belong to steps about to be replayed: drop them (metrics.jsonl) and tell
  # TensorBoard to discard its later events (purge_step), so a rerun never duplicates a step.
  start_step = start // accum
  if main_process:
    metrics_log = run_dir_lib.MetricsLog(run_dir / run_dir_lib.METRICS_FILE, start_step)
    writer = run_dir_lib.TensorBoard(run_dir, start_step)  # purge_step; staged locally for a URL run_dir
  else:
    metrics_log = writer = _NoLog()
  cleanup.callback(metrics_log.close)
  cleanup.callback(writer.close)
  total_steps = tcfg.num_steps
  num_steps = total_steps if stop_after is None else min(total_steps, stop_after)
  tokens_per_step = tcfg.batch_size * exp.data.seq_len
  stop = _StopOnSigterm()
  cleanup.callback(stop.restore)
  bar = _progress(start_step, total_steps, enabled=progress and main_process)
  note = bar.write if main_process else say  # below the progress bar
  cleanup.callback(bar.close)
  eval_fn = sharding.under_mesh(distributed.aligned(evaluate_lib.make_jitted_eval(model, exp.objective), "eval"),
                                mesh, exp.rules)
  clip_every = clip_search_lib.search_every(exp.objective, tcfg.eval_every)  # 0: no clipped-schedule search
  per_block_fn = (sharding.under_mesh(clip_search_lib.make_per_block_fn(model, exp.objective), mesh, exp.rules)
                  if clip_every else None)
  put = lambda b: data_lib.to_global_batch(b, batch_sh)
  save = lambda s, **kw: ckpt.save(s, state, data_iter=train_iter, config_dict=exp.raw.to_dict(), **kw)
  last, t0, last_logged = {}, time.time(), start_step
  stopping, many = False, jax.process_count() > 1
  for micro in range(start, num_steps * accum):
    state, metrics = step_fn(state, put(next(train_iter)))  # one micro-batch; optax.MultiSteps accumulates
    # One scalar per micro-step (the all-reduced finiteness of loss, grads and updated params): a bad step was not
    # applied, so `state` is the last good one; save it (unless it is saved already) and stop.
    if int(metrics["nonfinite"]):
      if last_saved != micro:
        save(micro, force=True)
      ckpt.wait()
      raise train_state_lib.NonFiniteError(
          f"step {micro // accum + 1}: non-finite loss, gradient or updated parameters (loss="
          f"{float(metrics['loss'])}); the update was not applied and the state before it is saved in "
          f"{ckpt.directory}. Lower optimizer.learning_rate or check the data.")
    if (micro + 1) % accum:
      continue
    done = (micro + 1) // accum  # optimizer steps
    if done % tcfg.log_every == 0 or done == num_steps:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.time()  # throughput over the logging window, so the first window's compile time washes out
      metrics["tokens_per_s"] = tokens_per_step * (done - last_logged) / max(now - t0, 1e-9)
      t0, last_logged = now, done
      for k, v in metrics.items():
        writer.add_scalar(f"train/{k}", v, done)
      metrics_log.write({"step": done, **metrics})
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
      last = metrics
    bar.update(1)
    if done % tcfg.eval_every == 0 or done == total_steps:
      ev = evaluate_lib.evaluate(state.params, eval_batches(exp, tok, batch_sh), model=model, objective=exp.objective,
                                 rng=jax.random.key(done), max_batches=tcfg.eval_batches, eval_fn=eval_fn,
                                 put_batch=put, token_bytes=token_bytes)
      for k, v in ev.items():
        writer.add_scalar(f"eval/{k}", v, done)
      metrics_log.write({"step": done, **{f"eval/{k}": v for k, v in ev.items()}})
      note(f"step {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items() if isinstance(v, float)))
      last.update({f"eval/{k}": v for k, v in ev.items()})
    if clip_every and done % clip_every == 0 and done < total_steps:  # before the save: checkpoints hold the interval
      state, sched = clip_search_lib.run(state, eval_batches(exp, tok, batch_sh), exp.objective, per_block_fn=per_block_fn,
                                         step=done, clip_sharding=state_sh.clip, put_batch=put)
      for k, v in sched.items():
        writer.add_scalar(k, v, done)
      metrics_log.write({"step": done, **sched})
      note(f"step {done}: training now draws t in [{sched['schedule/clip_low']:g}, "
                f"{sched['schedule/clip_high']:g}] (per-block NELBO variance {sched['schedule/min_variance']:.4g})")
      last.update(sched)
    if save(micro + 1):
      last_saved = micro + 1
    # SIGTERM (preemption, launch/tpu_vm.sh stop) on any process: every process sees the same answer at the same
    # step (a collective when there are several), so all save this step once and leave the loop together.
    stopping = distributed.any_process(stop.requested) if many else stop.requested
    if stopping:
      if last_saved != micro + 1:
        save(micro + 1, force=True)
        last_saved = micro + 1
      ckpt.wait()
      note(f"SIGTERM: saved step {done} in {ckpt.directory}; run the same command again to resume.")
      break
  bar.close()
  final_micro = int(jax.device_get(state.step))
  if last_saved != final_micro:
    save(final_micro, force=True)
  ckpt.wait()
  if final_micro == total_steps * accum and tcfg.num_samples > 0 and not stopping:
    text = write_samples(state.params, model, exp, tok, run_dir)  # every process samples, process 0 writes
    say(text)
  writer.flush()
  if main_process:
    plot_loss(run_dir / run_dir_lib.METRICS_FILE, run_dir / "loss.png")
  return last


class _NoLog:
  """metrics.jsonl / TensorBoard on processes other than 0: nothing is written."""

  def write(self, *_):
    pass

  add_scalar = flush = close = write


def create_state(model, tx, mesh, rules, *, seed: int, ema: bool, clip=None):
  """A TrainState created directly in its shardings; returns (state, state shardings, abstract state).
  ``clip``: the starting noise interval of ``objective.clip_search`` (:func:`clip_search.initial_clip`)."""
  abstract_params, param_sh = sharding.abstract_params_and_shardings(model, mesh, rules)
  params = sharding.init_sharded_params(model, mesh, jax.random.key(seed), rules)
  make = lambda p: train_state_lib.TrainState.create(p, tx, jax.random.key(seed + 1), use_ema=ema, clip=clip)
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
      self._old = None


def write_samples(params, model, exp, tok, run_dir) -> str:
  """A few generated samples, written to ``samples.txt`` in the run directory (image runs: ``samples.png``)."""
  if exp.image is not None:
    from ardiff.images import discrete
    from ardiff.sampling import generate as generate_lib
    return discrete.write_samples(params, model, exp, run_dir_lib.as_path(run_dir), sampling=generate_lib)
  from ardiff.sampling.generate import generate_for_experiment
  texts = generate_for_experiment(params, model, exp, tok, num_samples=exp.train.num_samples,
                                  num_tokens=exp.train.sample_tokens, rng=jax.random.key(0),
                                  temperature=exp.train.sample_temperature, top_p=exp.train.sample_top_p)
  body = "\n\n".join(f"--- sample {i} ---\n{t}" for i, t in enumerate(texts))
  from ardiff.data.word_share import sample_report
  from ardiff.sampling.generate import DEFAULT_PROMPT
  line = sample_report(texts, data_name=exp.data.name, tokenizer=exp.data.tokenizer, prompt=DEFAULT_PROMPT)
  body += f"\n\n{line}" if line else ""
  if distributed.is_main():
    (run_dir_lib.as_path(run_dir) / "samples.txt").write_text(body + "\n")
  return body


def evaluate_run(run_dir, *, max_batches: Optional[int] = None, use_ema: bool = False) -> dict:
  """Evaluates the latest checkpoint of ``run_dir`` with the config saved beside it."""
  image = read_config(run_dir)[0].get("image")
  if image is not None and image.get("kind") == "continuous":  # ACDiT runs: the test split's flow loss
    from ardiff.images import acdit_train
    exp, model, params = acdit_train.load(run_dir)
    return {"flow_loss": acdit_train.evaluate(params, model, exp, max_batches=max_batches or 10**9)}
  exp, model, params = load_run(run_dir, use_ema=use_ema)
  mesh = sharding.make_mesh(exp)
  tok = data_lib.make_tokenizer(exp.data.tokenizer)
  batch_sh = sharding.batch_sharding(mesh)
  put = lambda b: data_lib.to_global_batch(b, batch_sh)
  return evaluate_lib.evaluate(params, eval_batches(exp, tok, batch_sh), model=model, objective=exp.objective,
                               rng=jax.random.key(0), max_batches=max_batches, put_batch=put,
                               token_bytes=eval_token_bytes(exp, tok))


def _progress(start, total, enabled):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


EVAL_CURVES = (("eval/nelbo_per_token", "eval NELBO (nats/token)"), ("eval/nll_per_token", "eval NLL (nats/token)"))


def plot_loss(metrics_path, out_path):
  """``loss.png``: train loss and eval NELBO/NLL, all in nats per token, each its own labelled curve; returns the
  ``Figure``.

  Draws on a bare ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, so the caller's backend (a notebook's
  inline plots) is never changed."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  rows = [json.loads(line) for line in run_dir_lib.as_path(metrics_path).read_text().splitlines() if line.strip()]
  fig = Figure(figsize=(6, 4))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  if train:
    ax.plot(*zip(*train), label="train loss (nats/token)")
  for key, label in EVAL_CURVES:
    points = [(r["step"], r[key]) for r in rows if key in r]
    if points:
      ax.plot(*zip(*points), "o-", label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("nats per token")
  if ax.lines:
    ax.legend()
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  run_dir_lib.as_path(out_path).write_bytes(buf.getvalue())
  return fig



def main(argv) -> int:
  """``python -m ardiff train [--config FILE] [--config.SECTION.KEY=VALUE ...] [--noprogress]``."""
  from ardiff import cli_flags
  parsed = cli_flags.parse(argv, description=__doc__, default_config=DEFAULT_CONFIG,
                           flags=(cli_flags.Flag("progress", True, "show a progress bar", cli_flags.parse_bool),))
  if parsed is None:  # --help
    return 0
  config, flag_values = parsed
  experiment_lib.validate(config)  # bad values fail here, before any data work
  # jax.distributed was started by ardiff.cli when a launcher asked for it (ardiff.distributed); only process 0
  # shows progress
  train(config, progress=flag_values["progress"] and distributed.is_main())
  return 0
