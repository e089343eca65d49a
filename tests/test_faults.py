"""Damaged run directories, in-process: every reader (load_run for eval/sample/export, init_from, train resume) falls
back past a corrupt step and moves it aside, or stops with one clear error; metrics.jsonl is rewound on resume;
train() releases what it opened and never saves NaN parameters. (Subprocess faults -- kill -9 during a save,
SIGTERM -- are in tests/test_train_e2e.py.)"""

import json
import os
import shutil
import signal

import jax
import numpy as np
import optax
import pytest

from ardiff import cli, experiment, sharding
from ardiff.model import Transformer, init_params
from ardiff.checkpoints import checkpointer as checkpoint_lib
from ardiff.checkpoints import paths as paths_lib
from ardiff.checkpoints import run_dir as run_dir_lib
from ardiff.training import main as train_main
from ardiff.training import optimizer as optimizer_lib
from ardiff.training import train_state as train_state_lib
from tiny_runs import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# orbax's async thread reports a closed event loop after a failed read of a damaged step; harmless here
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, data_dir):
  """A run directory with steps 1 and 2 (params of step s are 's * base'), as `ardiff train` leaves it."""
  run_dir = tmp_path_factory.mktemp("good")
  c = tiny_config(run_dir, data_dir)
  exp = experiment.validate(c)
  base = init_params(exp.model, jax.random.key(0))
  with checkpoint_lib.Checkpointer(run_dir / "checkpoints", save_every=1) as ckpt:
    for s in (1, 2):
      params = jax.tree.map(lambda x: s * x, base)
      ckpt.save(s, train_state_lib.TrainState.create(params, optax.sgd(0.1), jax.random.key(1)),
                config_dict=c.to_dict())
  run_dir_lib.write_config(run_dir, c)
  return str(run_dir), base


def _copy(good_run, tmp_path, name="run"):
  dst = str(tmp_path / name)
  shutil.copytree(good_run[0], dst)
  return dst


def _truncate_arrays(step_dir):
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state", "d")):
    for f in files:
      with open(os.path.join(dirpath, f), "r+b") as fh:
        fh.truncate(3)


def _assert_params(params, base, factor):
  jax.tree.map(lambda p, b: np.testing.assert_array_equal(np.asarray(p), factor * np.asarray(b)), params, base)


def _export(run_dir, out, capsys):
  rc = cli.main(["ardiff", "export", "--run_dir", run_dir, "--to", "params", "--out", str(out)])
  return rc, capsys.readouterr()


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "no_metadata"])
def test_readers_fall_back_and_move_the_step_aside(good_run, tmp_path, capfd, damage):
  """capfd: what orbax's threads print straight to file descriptor 2 counts too (a zeroed step's failed read made
  tensorstore print a 'RuntimeError: Event loop is closed' traceback per pending read)."""
  run_dir = _copy(good_run, tmp_path)
  step2 = os.path.join(run_dir, "checkpoints", "2")
  if damage == "truncated":
    _truncate_arrays(step2)
  elif damage == "zeroed":  # same sizes, so the structural check passes and orbax's read fails on the data
    for dirpath, _, files in os.walk(os.path.join(step2, "state")):
      for f in files:
        if os.sep + "d" in dirpath:
          path = os.path.join(dirpath, f)
          with open(path, "r+b") as fh:
            fh.write(bytes(os.path.getsize(path)))
  else:
    os.remove(os.path.join(step2, "state", "_METADATA"))
  if damage == "zeroed":  # its noise came from orbax's threads at the end of a process: run a real one
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "ardiff", "export", "--run_dir", run_dir, "--to", "params", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Event loop" not in proc.stderr, proc.stderr
    assert proc.stderr.count("RuntimeWarning: checkpoint step 2") == 1, proc.stderr
    _, _, params = train_main.load_run(str(tmp_path / "out"))
    _assert_params(params, good_run[1], 1)
    return
  with pytest.warns(RuntimeWarning, match="step 2 .* corrupt or incomplete .* moved aside") as record:
    rc, out = _export(run_dir, tmp_path / "out", capfd)
  assert rc == 0, out.err
  assert len([w for w in record if "step 2" in str(w.message)]) == 1  # warned once
  assert "Traceback" not in out.err and "Event loop" not in out.err, out.err
  names = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
  assert "2" not in names and any(n.startswith("2.corrupt-") for n in names), names  # renamed, not deleted
  _, _, params = train_main.load_run(str(tmp_path / "out"))
  _assert_params(params, good_run[1], 1)  # the previous step
  # the next reader sees a sound directory: no warning, same step
  _, _, again = train_main.load_run(run_dir)
  _assert_params(again, good_run[1], 1)


def test_init_from_falls_back_too(good_run, tmp_path, data_dir):
  run_dir = _copy(good_run, tmp_path)
  _truncate_arrays(os.path.join(run_dir, "checkpoints", "2"))
  exp = experiment.validate(tiny_config(tmp_path / "new", data_dir))  # data.data_dir must be a str
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  from ardiff.model import Transformer
  with pytest.warns(RuntimeWarning, match="step 2"):
    params = run_dir_lib.load_params(run_dir, Transformer(exp.model), mesh, exp.rules)
  _assert_params(params, good_run[1], 1)


@pytest.mark.parametrize("damage,message", [
    ("garbage_config", "config.json is not valid JSON"),
    ("empty_checkpoints", "holds no finished checkpoint"),
    ("all_truncated", "could be restored"),
    ("no_config", "config.json not found"),
])
def test_damaged_run_dirs_give_one_clear_error(good_run, tmp_path, capsys, damage, message):
  run_dir = _copy(good_run, tmp_path)
  ckpts = os.path.join(run_dir, "checkpoints")
  if damage == "garbage_config":
    with open(os.path.join(run_dir, "config.json"), "wb") as f:
      f.write(b"\x00{not json")
  elif damage == "empty_checkpoints":
    shutil.rmtree(ckpts)
    os.makedirs(ckpts)
  elif damage == "all_truncated":
    for s in ("1", "2"):
      _truncate_arrays(os.path.join(ckpts, s))
  else:
    os.remove(os.path.join(run_dir, "config.json"))
  before = sorted(os.listdir(ckpts))
  rc, out = _export(run_dir, tmp_path / "out", capsys)
  assert rc == 2
  assert out.err.startswith("error: ") and message in out.err, out.err
  assert "Traceback" not in out.err and len(out.err.splitlines()) <= 3
  assert not os.path.exists(tmp_path / "out")  # nothing half-written
  assert sorted(os.listdir(ckpts)) == before  # nothing moved when no step restores: that may be a config mismatch


def test_a_config_mismatch_moves_nothing(good_run, tmp_path):
  """Every step failing alike is not damage (a changed model config): the steps stay where they are."""
  run_dir = _copy(good_run, tmp_path)
  target = {"w": jax.ShapeDtypeStruct((3,), np.float32)}
  with checkpoint_lib.Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
    with pytest.raises(ValueError, match="could be restored"):
      ckpt.restore(target)
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["1", "2"]


def test_quarantine_keeps_both_copies_of_a_step_damaged_twice(tmp_path):
  d = tmp_path / "c"
  for _ in range(2):
    os.makedirs(d / "5")
    assert checkpoint_lib.quarantine(d, 5, "missing state/") is not None
  assert sorted(os.listdir(d)) == ["5.corrupt-missing", "5.corrupt-missing-2"]


def test_rewind_metrics_drops_later_and_cut_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "loss": float(s)}) for s in range(1, 9)] + ['{"step": 9, "lo']  # cut by kill -9
  path.write_text("\n".join(lines))
  kept = run_dir_lib.rewind_metrics(path, 5)
  assert [json.loads(x)["step"] for x in kept] == [1, 2, 3, 4, 5]
  assert path.read_text() == "".join(x + "\n" for x in lines[:5])
  log = run_dir_lib.MetricsLog(path, 3)
  log.write({"step": 4, "loss": 0.5})
  assert path.read_text().splitlines()[-1] == '{"step": 4, "loss": 0.5}'  # flushed at once (loss.png reads it)
  log.close()
  assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_paths_keep_urls_and_expand_local(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  for url in ("gs://bucket/x", "s3://b/run"):
    p = paths_lib.as_path(url)
    assert str(p) == url and str(p / "checkpoints") == url + "/checkpoints"  # never ./gs:/bucket/x
  assert str(paths_lib.as_path("~/run")) == str(tmp_path / "run")
  assert paths_lib.clean_path("gs://bucket/out") == "gs://bucket/out" and paths_lib.clean_path("~/o") == str(tmp_path / "o")
  monkeypatch.chdir(tmp_path)
  assert str(paths_lib.as_path("rel")) == str(tmp_path / "rel")


def test_train_nan_update_saves_the_last_good_state_and_releases_everything(tmp_path, data_dir, monkeypatch):
  """A NaN learning rate gives finite gradients but NaN parameters: the first update is refused, the run stops with
  the (finite) state before it saved, and train() leaves no SIGTERM handler, open file or writer behind."""
  make = optimizer_lib.make_optimizer

  def nan_optimizer(cfg):
    _, schedule = make(cfg)
    return optax.sgd(float("nan")), schedule
  monkeypatch.setattr(optimizer_lib, "make_optimizer", nan_optimizer)
  handler_before = signal.getsignal(signal.SIGTERM)
  run_dir = tmp_path / "nan"
  c = tiny_config(run_dir, data_dir)
  c.train.update(num_steps=3, log_every=1, eval_every=100, save_every=100)
  with pytest.raises(train_state_lib.NonFiniteError, match="step 1: non-finite"):
    train_main.train(c, progress=False)
  assert signal.getsignal(signal.SIGTERM) is handler_before
  fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
         if os.path.exists(f"/proc/self/fd/{fd}")]
  assert not [f for f in fds if f.startswith(str(run_dir))], fds
  assert sorted(n for n in os.listdir(run_dir / "checkpoints") if n.isdigit()) == ["0"]
  _, _, params = train_main.load_run(str(run_dir))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_loss_plot_shows_every_curve_in_nats_and_keeps_the_backend(tmp_path):
  import sys

  import matplotlib
  backend, pyplot_loaded = matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules
  rows = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 11)]
  rows += [{"step": 5, "eval/nelbo_per_token": 4.0, "eval/bits_per_token": 5.77},
           {"step": 10, "eval/nelbo_per_token": 3.0, "eval/bits_per_token": 4.33}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  fig = train_main.plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
  curves = {line.get_label(): line.get_xydata().tolist() for line in fig.axes[0].lines}
  assert curves == {"train loss (nats/token)": [[r["step"], r["loss"]] for r in rows[:10]],
                    "eval NELBO (nats/token)": [[5.0, 4.0], [10.0, 3.0]]}  # bits are not mixed in; last eval shown
  assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert matplotlib.get_backend() == backend
  assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded  # no pyplot: it would pick/switch a backend


def tensorboard_scalars(tb_dir, tag: str) -> list:
  """``[(step, value), ...]`` of ``tag`` as TensorBoard shows it (its own reader, purges applied), in file order."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(tb_dir))
  acc.Reload()
  return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.usefixtures("fast_compiles")  # compile-dominated; what is checked is which steps TensorBoard shows
def test_tensorboard_shows_each_step_once_after_resuming_from_an_earlier_step(tmp_path, data_dir):
  """A run stopped at step 6 whose step-6 checkpoint is then damaged resumes from step 4 and replays steps 5 and 6:
  the events the first run logged for them are purged (purge_step), so TensorBoard shows steps 1..8 once each, with
  the values metrics.jsonl keeps."""
  run_dir = tmp_path / "run"
  c = tiny_config(run_dir, data_dir)
  c.train.update(num_steps=9, log_every=1, save_every=4, eval_every=100)  # never reached: no eval compile
  train_main.train(c, progress=False, stop_after=6)
  assert [s for s, _ in tensorboard_scalars(run_dir / "tb", "train/loss")] == [1, 2, 3, 4, 5, 6]
  _truncate_arrays(run_dir / "checkpoints" / "6")
  with pytest.warns(RuntimeWarning, match="step 6"):
    train_main.train(c, progress=False, stop_after=8)
  shown = tensorboard_scalars(run_dir / "tb", "train/loss")
  assert [s for s, _ in shown] == list(range(1, 9)), shown  # without the purge: 1..6, 5, 6, 7, 8
  kept = {r["step"]: r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in r}
  assert sorted(kept) == list(range(1, 9))
  np.testing.assert_allclose([v for _, v in shown], [kept[s] for s in range(1, 9)], rtol=1e-6)  # float32 events


def test_ema_asked_of_a_run_without_one_is_not_damage(good_run, tmp_path, capsys):
  """--ema on a run trained without optimizer.ema_decay: one error saying so (not 'the checkpoints are damaged'),
  nothing moved aside; read from orbax's type mismatch at ema_params, with or without config.json beside them."""
  run_dir = _copy(good_run, tmp_path)
  ckpts = os.path.join(run_dir, "checkpoints")
  rc = cli.main(["ardiff", "export", "--run_dir", run_dir, "--to", "params", "--ema", "--out", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error: ") and "holds no EMA parameters" in err and "drop --ema" in err, err
  assert "damaged" not in err and not os.path.exists(tmp_path / "o")
  exp = experiment.validate(tiny_config(run_dir, str(tmp_path)))
  abstract, shardings = sharding.abstract_params_and_shardings(Transformer(exp.model), sharding.make_mesh(exp),
                                                               exp.rules)
  os.remove(os.path.join(run_dir, "config.json"))
  with pytest.raises(checkpoint_lib.MissingItemError, match="holds no EMA parameters"):
    run_dir_lib.restore_params(ckpts, sharding.with_shardings(abstract, shardings), use_ema=True)
  assert sorted(os.listdir(ckpts)) == ["1", "2"]
