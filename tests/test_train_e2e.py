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


def run_train(run_dir, *extra, data_dir, wait=True, devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT)
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


def test_kill_minus_9_and_resume_is_bit_identical(tmp_path, data_dir):
  common = ["--config.train.num_steps=40", "--config.train.log_every=1", "--config.train.eval_every=100",
            "--config.train.save_every=4", "--config.train.num_samples=0"]
  ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
  proc = run_train(ref_dir, *common, data_dir=data_dir)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  reference = losses(ref_dir)

  victim = run_train(cut_dir, *common, data_dir=data_dir, wait=False)
  deadline = time.time() + 300
  while time.time() < deadline:
    # Kill once step 4's checkpoint is final (orbax renames it into place) and training has moved past it.
    if (cut_dir / "checkpoints" / "4").is_dir() and max(losses(cut_dir), default=0) >= 6:
      break
    time.sleep(0.02)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert max(losses(cut_dir)) < 40, "the run finished before it could be killed"
  proc = run_train(cut_dir, *common, data_dir=data_dir)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "Resumed" in proc.stdout
  resumed = losses(cut_dir)
  assert sorted(resumed) == list(range(1, 41))
  for step in range(1, 41):
    assert resumed[step] == reference[step], (step, resumed[step], reference[step])  # bit for bit


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
