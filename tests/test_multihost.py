"""Several JAX processes as one job on this machine (the code path of a TPU pod: one process per host).

Processes talk over localhost: gloo CPU collectives, `launch/local.sh --processes 2 --fake-devices 2` (2 processes x 2
devices = 4 global devices). The 1-process references run with 4 devices and the same gloo collectives
(ARDIFF_COORDINATOR with one process): XLA's in-process all-reduce adds partial sums in another order than gloo, which
moves the last bit of the loss; with the same collectives everything below is bit-identical.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "local.sh")
# tiny byte-level model (vocab 260: the byte tokenizer's 259 ids padded to divide mesh.tensor); mesh fsdp=2 x
# tensor=2 spans both processes' devices (fsdp across the processes, tensor within)
TINY = ["--config", os.path.join(ROOT, "configs", "default_byte.py"), "--progress=false",
        "--config.model.vocab_size=260", "--config.model.embed_dim=32",
        "--config.model.num_layers=2", "--config.model.num_heads=2", "--config.model.num_kv_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
        "--config.data.seq_len=32", "--config.train.batch_size=8", "--config.train.eval_batches=2",
        "--config.optimizer.warmup_steps=2", "--config.mesh.data=1", "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2", "--config.train.log_every=1", "--config.train.save_every=5",
        "--config.train.eval_every=10", "--config.train.num_samples=2", "--config.train.sample_tokens=8"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The Shakespeare TFDS dataset, prepared once here (two processes preparing it at once would race)."""
  from ardiff.data import shakespeare
  path = str(tmp_path_factory.mktemp("tfds"))
  shakespeare.prepare(path)
  return path


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("ARDIFF_") and k != "XLA_FLAGS"}
  # most XLA passes off (as tests/conftest.py's fast_compiles): these runs are compile-dominated, and every run
  # compared here compiles alike, so the comparisons stay exact
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", ARDIFF_HEARTBEAT_TIMEOUT="10",
             JAX_DISABLE_MOST_OPTIMIZATIONS="true", **extra)
  return env


def _run(cmd, env, timeout=900):
  """Runs ``cmd`` in its own process group; on a timeout the whole group is killed (no stray JAX processes)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate()
    raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{(out + err)[-3000:]}") from None
  return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _job_env(processes, index, port, env=None):
  return _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // processes}",
              ARDIFF_COORDINATOR=f"127.0.0.1:{port}", ARDIFF_NUM_PROCESSES=str(processes),
              ARDIFF_PROCESS_ID=str(index), **(env or {}))


def one_process(run_dir, data_dir, *flags, env=None):
  """`ardiff train` as 1 process x 4 devices with gloo collectives (a one-process distributed job)."""
  cmd = [sys.executable, "-m", "ardiff", "train", f"--config.train.run_dir={run_dir}",
         f"--config.data.data_dir={data_dir}", *TINY, *flags]
  return _run(cmd, _job_env(1, 0, _port(), env))


def two_processes(run_dir, data_dir, *flags, env=None, wait=True):
  """`launch/local.sh --processes 2 --fake-devices 2 ardiff train ...`."""
  cmd = ["bash", LAUNCH, "--processes", "2", "--fake-devices", "2", "--python", sys.executable,
         f"--config.train.run_dir={run_dir}", f"--config.data.data_dir={data_dir}", *TINY, *flags]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
  return _run(cmd, _env(**(env or {})))


def records(run_dir):
  """step -> {train loss / eval values}; each step's train record appears once (resumes rewind metrics.jsonl)."""
  rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  steps = [r["step"] for r in rows if "loss" in r]
  assert len(steps) == len(set(steps)), f"duplicate records: {sorted(steps)}"
  out = {}
  for r in rows:
    out.setdefault(r["step"], {}).update(r)
  for r in out.values():
    r.pop("tokens_per_s", None)  # wall-clock throughput
  return out


def committed(run_dir):
  return sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")) if s.isdigit())


def _ok(proc):
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0 and "Traceback" not in out, out[-4000:]
  return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir):
  """20 uninterrupted steps of 1 process x 4 devices (gloo collectives)."""
  ref = tmp_path_factory.mktemp("ref")
  _ok(one_process(ref, data_dir, "--config.train.num_steps=20"))
  return ref


def test_two_processes_train_like_one_and_resume_across_process_counts(tmp_path, data_dir, reference_run):
  """20 steps of 2 processes x 2 devices equal 1 process x 4 devices bit for bit (losses, eval, end-of-run samples),
  through a chain of interruptions: 2 processes, SIGTERM to process 1 only at step 7 -> both save step 7 and exit 0;
  resumed on 1 process (2 -> 1), SIGTERM at step 14; resumed on 2 processes (1 -> 2) to the end."""
  ref = reference_run
  reference = records(ref)
  assert sorted(s for s in reference if "loss" in reference[s]) == list(range(1, 21))
  assert "eval/nelbo_per_token" in reference[20] and "eval/bits_per_byte" in reference[20]

  run = tmp_path / "chain"
  proc = two_processes(run, data_dir, "--config.train.num_steps=20", env={"ARDIFF_TEST_KILL_AT": "sigterm:7@1"})
  out = _ok(proc)
  assert committed(run)[-1] == 7 and out.count("SIGTERM: saved step 7 in ") == 1, out[-3000:]
  logs = run / "logs"
  assert "SIGTERM: saved step" not in (logs / "train-process-1.log").read_text()  # only process 0 talks
  assert "step 10:" not in out

  proc = one_process(run, data_dir, "--config.train.num_steps=20", env={"ARDIFF_TEST_KILL_AT": "sigterm:14"})
  out = _ok(proc)
  assert f"Resumed from {run}/checkpoints at step 7." in out and committed(run)[-1] == 14, out[-3000:]

  out = _ok(two_processes(run, data_dir, "--config.train.num_steps=20"))
  assert f"Resumed from {run}/checkpoints at step 14." in out, out[-3000:]
  assert committed(run)[-1] == 20
  resumed = records(run)
  assert sorted(resumed) == sorted(reference)
  for step in sorted(reference):
    assert resumed[step] == reference[step], (step, resumed[step], reference[step])  # bit for bit
  assert (run / "samples.txt").read_text() == (ref / "samples.txt").read_text()
  assert (run / "loss.png").exists() and (run / "config.json").exists()


def test_kill_minus_9_of_one_process_stops_the_other_within_bounded_time(tmp_path, data_dir):
  """kill -9 of process 1: process 0 fails its next collective (or misses heartbeats) and exits non-zero on its own,
  before the launcher's grace period would kill it; the launcher exits non-zero and names the dead process."""
  run = tmp_path / "killed"
  launcher = two_processes(run, data_dir, "--config.train.num_steps=100000", "--config.train.eval_every=100000",
                           "--grace", "120", wait=False)
  try:
    deadline = time.time() + 600
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
      time.sleep(0.5)
    assert (run / "metrics.jsonl").exists(), "training never logged a step"
    victim = int((run / "logs" / "train-process-1.pid").read_text())
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    out, _ = launcher.communicate(timeout=150)
    elapsed = time.time() - killed_at
  finally:
    if launcher.poll() is None:  # a failure above: leave no process behind
      os.killpg(launcher.pid, signal.SIGKILL)
  assert launcher.returncode != 0, out[-3000:]
  assert "process 1 exited with status 137" in out, out[-3000:]
  assert "killing the" not in out, out[-3000:]  # process 0 stopped by itself, within the heartbeat bound
  log0 = (run / "logs" / "train-process-0.log").read_text()
  assert "process 0 exited with status" in out, out[-3000:]
  assert elapsed < 120, elapsed
  # ours (a collective failed: PeerFailure) or jax's (missed heartbeats: "another task died")
  assert ("another process of this run most likely died" in log0 or "another task died" in log0), log0[-3000:]


def test_eval_and_every_sampler_give_the_same_numbers_and_tokens_under_two_processes(tmp_path, reference_run):
  """tests/multihost_samplers.py (eval + block diffusion, AR, TiDAR, speculative, DiffuSpec) on the
  reference run: 2 processes x 2 devices write exactly what 1 process x 4 devices writes."""
  script = os.path.join(ROOT, "tests", "multihost_samplers.py")
  outs = {}
  for processes in (1, 2):
    out = tmp_path / f"p{processes}.json"
    port = _port()
    procs = [subprocess.Popen([sys.executable, script, str(reference_run), str(out)], cwd=ROOT,
                              env=_job_env(processes, i, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(processes)]
    try:
      logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    outs[processes] = json.loads(out.read_text())
  assert set(outs[1]) == {"eval", "block_diffusion", "ar", "tidar", "speculative", "diffuspec"}
  for name in outs[1]:
    assert outs[2][name] == outs[1][name], name


def test_restoring_another_shard_count_is_refused(data_dir):
  """The data iterator of a 2-shard run (mesh.data * mesh.fsdp = 2) is refused by a 4-shard run with a message
  naming both counts; the same count restores exactly, whichever process holds which shard."""
  from ardiff.data import pipeline
  kw = dict(split="validation", seed=0, seq_len=32)
  cfg = {"data_dir": data_dir}
  two = {s: pipeline.make_dataset(cfg, batch_size=4, shard_index=s, shard_count=2, **kw)[0] for s in (0, 1)}
  whole = pipeline.ShardedBatches(two, 2)
  first = next(whole)
  np.testing.assert_array_equal(first["tokens"][:2], next(iter(two[0]))["tokens"])  # rows of shard 0, then 1
  np.testing.assert_array_equal(first["tokens"][2:], next(iter(two[1]))["tokens"])
  state = whole.get_state()
  after = next(whole)
  only_one = pipeline.ShardedBatches({1: two[1]}, 2)  # "process 1": shard 1 only
  only_one.set_state(state)
  np.testing.assert_array_equal(next(only_one)["tokens"], after["tokens"][2:])
  four = pipeline.ShardedBatches({s: pipeline.make_dataset(cfg, batch_size=4, shard_index=s, shard_count=4, **kw)[0]
                                  for s in range(4)}, 4)
  with pytest.raises(pipeline.ShardCountError, match="2 data shards but this run has 4"):
    four.set_state(state)


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
  """DRY_RUN=1 launch/tpu_vm.sh: the gcloud lines of create / run / stop, no jax, no network."""
  env = dict(os.environ, DRY_RUN="1", TPU_NAME="pod", ZONE="us-east5-a", ACCELERATOR="v5p-16", PROJECT="proj")
  run = lambda *a: subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), *a], env=env,
                                  capture_output=True, text=True, timeout=60)
  create = run("create")
  assert create.returncode == 0, create.stderr
  assert create.stdout.startswith("gcloud compute tpus tpu-vm create pod --accelerator-type=v5p-16 "
                                  "--version=v2-alpha-tpuv5"), create.stdout
  assert "--zone=us-east5-a --project=proj" in create.stdout
  started = run("run", "--config.train.run_dir=gs://bucket/runs/x")
  assert started.returncode == 0, started.stderr
  line = started.stdout
  assert line.startswith("gcloud compute tpus tpu-vm ssh pod --worker=all --command="), line
  assert "ARDIFF_DISTRIBUTED=1" in line and "--config.train.run_dir=gs://bucket/runs/x" in line
  assert "logs/host-" in line
  setup = run("setup")
  assert setup.returncode == 0 and "sys.version_info" in setup.stdout and "3.11" in setup.stdout, setup.stdout
  queued = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), "create"], capture_output=True,
                          text=True, timeout=60, env=dict(env, QUEUED="1", ACCELERATOR="v5litepod-64", SPOT="1"))
  assert queued.stdout.startswith("gcloud compute tpus queued-resources create pod --node-id=pod "
                                  "--accelerator-type=v5litepod-64 --runtime-version=v2-alpha-tpuv5-lite --spot"), \
      queued.stdout
  v6e = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), "create"], capture_output=True,
                       text=True, timeout=60, env=dict(env, ACCELERATOR="v6e-16"))
  assert "--version=v2-alpha-tpuv6e --scopes=https://www.googleapis.com/auth/cloud-platform" in v6e.stdout
