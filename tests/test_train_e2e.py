"""End-to-end runs of `python -m ardiff train` in subprocesses: outputs, falling loss, kill -9 and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.embed_dim=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=1", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
        "--config.data.seq_len=32", "--config.train.batch_size=8", "--config.train.eval_batches=2",
        "--config.optimizer.warmup_steps=2"]


def run_train(run_dir, *extra, data_dir, wait=True, devices=1, env=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT, **(env or {}))
  cmd = [sys.executable, "-m", "ardiff", "train", "--progress=false", f"--config.train.run_dir={run_dir}",
         f"--config.data.data_dir={data_dir}", *TINY, *extra]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  return proc


def losses(run_dir):
  """step -> loss, the last record of each step winning (a resumed run re-logs the steps it replays)."""
  out = {}
  for line in open(os.path.join(run_dir, "metrics.jsonl")):
    row = json.loads(line)
    if "loss" in row:
      out[row["step"]] = row["loss"]
  return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_cli_trains_and_writes_everything(tmp_path, data_dir):
  run_dir = tmp_path / "run"
  proc = run_train(run_dir, "--config.train.num_steps=30", "--config.train.log_every=5",
                   "--config.train.eval_every=15", "--config.train.save_every=10", "--config.train.num_samples=2",
                   "--config.train.sample_tokens=16", data_dir=data_dir, devices=2)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  steps = losses(run_dir)
  assert steps[30] < steps[5], steps  # the loss falls
  assert sorted(int(s) for s in os.listdir(run_dir / "checkpoints") if s.isdigit())[-1] == 30
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tb"))
  samples = (run_dir / "samples.txt").read_text()
  assert samples.count("--- sample") == 2
  assert (run_dir / "loss.png").stat().st_size > 1000
  evals = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if "eval/" in line]
  assert evals and "eval/bits_per_byte" in evals[-1] and "eval/perplexity_upper_bound" in evals[-1]


COMMON = ["--config.train.num_steps=40", "--config.train.log_every=1", "--config.train.eval_every=100",
          "--config.train.save_every=4", "--config.train.num_samples=0"]


def records(run_dir):
  """step -> loss of every train record; each step must appear once (a resumed run rewinds metrics.jsonl)."""
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  steps = [r["step"] for r in rows if "loss" in r]
  assert len(steps) == len(set(steps)), f"duplicate records: {sorted(steps)}"
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def committed(run_dir):
  return sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")) if s.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """The losses of an uninterrupted 40-step run, which every interrupted-and-resumed run must reproduce bit for bit."""
  ref_dir = tmp_path_factory.mktemp("ref")
  proc = run_train(ref_dir, *COMMON, data_dir=data_dir)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return records(ref_dir)


def _assert_same_losses(run_dir, reference):
  resumed = records(run_dir)
  assert sorted(resumed) == list(range(1, 41))
  for step in range(1, 41):
    assert resumed[step] == reference[step], (step, resumed[step], reference[step])  # bit for bit


def test_sigterm_and_kill_minus_9_around_async_saves_resume_bit_identically(tmp_path, data_dir, reference):
  """One run interrupted four times (hooks in ardiff/checkpoints/checkpointer.py): SIGTERM between periodic saves (a
  preemption: one save, rc 0, its message), then kill -9 before a save starts, while its asynchronous write runs, and
  after its commit; then the latest step's arrays are truncated. Each rerun restores the last complete (sound) step;
  the finished run logs each step once and its losses equal the uninterrupted run's bit for bit."""
  run_dir = tmp_path / "faults"
  resume_from = None
  for fault in ("sigterm:6", "before:12", "during:20", "after:28", None):
    env = {"PYTHONUNBUFFERED": "1", **({"ARDIFF_TEST_KILL_AT": fault} if fault else {})}
    proc = run_train(run_dir, *COMMON, data_dir=data_dir, env=env)
    out = proc.stdout + proc.stderr
    if resume_from is not None:
      assert f"Resumed from {run_dir}/checkpoints at step {resume_from}." in proc.stdout, (fault, out)
    if fault is None:
      assert proc.returncode == 0, out
      break
    when, step = fault.split(":")
    step = int(step)
    complete = committed(run_dir)
    if when == "sigterm":
      assert proc.returncode == 0 and "Traceback" not in out and "StepAlreadyExists" not in out, out
      assert out.count("SIGTERM: saved step") == 1 and f"SIGTERM: saved step {step} in " in out, out
      assert complete[-1] == step
    else:
      assert proc.returncode == -signal.SIGKILL, (fault, out)
      if when == "after":
        assert complete[-1] == step
      else:  # the interrupted save is never listed as a step (orbax commits by renaming a finished directory)
        assert complete[-1] < step or (when == "during" and complete[-1] == step), (fault, complete)
    resume_from = complete[-1]  # the last complete step, which the next run must restore
    if when == "after":  # and then the latest step is damaged: the last run moves it aside and resumes before it
      for dirpath, _, files in os.walk(os.path.join(run_dir, "checkpoints", str(step), "state", "d")):
        for f in files:
          os.truncate(os.path.join(dirpath, f), 3)
      resume_from = complete[-2]
  assert out.count("checkpoint step 28 ") == 1 and "moved aside to 28.corrupt-" in out, out  # warned once
  assert any(n.startswith("28.corrupt-") for n in os.listdir(os.path.join(run_dir, "checkpoints")))
  assert committed(run_dir)[-1] == 40  # it got past step 28, saving it again without StepAlreadyExistsError
  _assert_same_losses(run_dir, reference)
  # TensorBoard: the events a killed run logged after its last checkpoint are purged by the rerun (purge_step), so
  # no step shows twice; the steps a kill -9 caught in tensorboardX's buffers may be missing, never stale
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(run_dir / "tb"))
  acc.Reload()
  shown = [(e.step, e.value) for e in acc.Scalars("train/loss")]
  assert len({s for s, _ in shown}) == len(shown), sorted(s for s, _ in shown)
  assert shown and shown[-1][0] == 40
  assert all(v == pytest.approx(reference[s], rel=1e-6) for s, v in shown)  # float32 events


@pytest.mark.parametrize("override,message", [
    ("--config.objective.block_size=5", "must divide the sequence length"),
    ("--config.train.batch_size=6", "not divisible by the data-parallel size"),
    ("--config.model.num_kv_heads=3", "must divide model.num_heads"),
])
def test_bad_configs_stop_before_writing(tmp_path, data_dir, override, message):
  run_dir = tmp_path / "bad"
  proc = run_train(run_dir, override, data_dir=data_dir, devices=4)
  assert proc.returncode != 0
  assert message in proc.stdout + proc.stderr
  assert not run_dir.exists()  # nothing written half-way


def test_unknown_config_key_is_rejected(tmp_path, data_dir):
  proc = run_train(tmp_path / "x", "--config.train.num_stepz=3", data_dir=data_dir)
  assert proc.returncode != 0 and "num_stepz" in proc.stdout + proc.stderr
