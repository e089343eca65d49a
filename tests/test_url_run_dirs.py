"""Run directories and export paths given as URLs (``gs://bucket/...``): training, resume past a corrupt step,
TensorBoard, eval, ``init_from`` and ``export --to params`` all write through ``etils.epath``/orbax into the bucket,
and nothing lands in a local directory named after the URL (``./gs:/bucket/...``).

The bucket is a local directory behind a test-only fsspec filesystem registered for the ``gs``/``gcs`` protocols
(what epath uses for ``gs://`` without TensorFlow), and orbax's tensorstore spec for a ``gs://`` path is pointed at the
same directory with tensorstore's ``file`` driver (tensorstore talks to GCS itself, not through fsspec).
"""

import json
import os

import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_registry
from orbax.checkpoint._src.path import gcs_utils

from ardiff import cli, sharding
from ardiff.checkpoints import run_dir as run_dir_lib
from ardiff.model import Transformer
from ardiff.training import main as train_main
from tiny_runs import tiny_config

# orbax's async thread reports a closed event loop after a failed read of a damaged step; harmless here
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _local_bucket_fs(root: str):
  """An fsspec filesystem for ``gs://`` that keeps every object under the local directory ``root``."""

  class LocalBucket(LocalFileSystem):
    protocol = ("gs", "gcs")

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          path = path[len(prefix):]
          break
      path = "/" + path.lstrip("/")
      if path == root or path.startswith(root + "/"):  # a name this filesystem returned (ls, glob, walk)
        return path
      return root + path

  return LocalBucket


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local directory that ``gs://`` URLs read and write during the test."""
  root = tmp_path / "bucket"
  root.mkdir()
  fs = _local_bucket_fs(str(root))
  for protocol in ("gs", "gcs"):
    monkeypatch.setitem(fsspec_registry, protocol, fs)
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda p: {"driver": "file", "path": fs._strip_protocol(p)})
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False)  # no GCS API calls
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches one filesystem per protocol
  yield root
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


def _config(run_dir, data_dir):
  # num_steps is never reached: no end-of-run eval to compile
  return tiny_config(run_dir, data_dir, num_steps=9, log_every=1, save_every=4, eval_every=100)


def _tensorboard_steps(tb_dir, tag: str) -> list:
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  acc = EventAccumulator(str(tb_dir))
  acc.Reload()
  return [e.step for e in acc.Scalars(tag)]


def _files(root) -> set:
  return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.usefixtures("fast_compiles")  # compile-dominated; what is checked is where files land
def test_a_gs_run_dir_trains_resumes_evaluates_and_exports_into_the_bucket(bucket, tmp_path, monkeypatch, capsys):
  cwd = tmp_path / "cwd"  # where a URL made into a local path (./gs:/bucket/...) would appear
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  c = _config("gs://bkt/run", str(tmp_path / "tfds"))
  train_main.train(c, progress=False, stop_after=6)
  run = bucket / "bkt" / "run"
  assert {"config.json", "metrics.jsonl", "loss.png"} <= set(os.listdir(run))
  assert sorted(n for n in os.listdir(run / "checkpoints") if n.isdigit()) == ["4", "6"]
  for dirpath, _, files in os.walk(run / "checkpoints" / "6" / "state" / "d"):  # damage the latest step
    for f in files:
      os.truncate(os.path.join(dirpath, f), 3)

  with pytest.warns(RuntimeWarning, match="step 6 .* moved aside"):
    train_main.train(c, progress=False, stop_after=8)
  assert "Resumed from gs://bkt/run/checkpoints at step 4." in capsys.readouterr().out
  names = os.listdir(run / "checkpoints")
  assert "8" in names and any(n.startswith("6.corrupt-") for n in names), names
  assert _tensorboard_steps(run / "tb", "train/loss") == list(range(1, 9))  # uploaded, and rewound to step 4
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))

  ev = train_main.evaluate_run("gs://bkt/run", max_batches=1)
  assert np.isfinite(ev["nelbo_per_token"])
  exp, model, params = train_main.load_run("gs://bkt/run")
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  init = run_dir_lib.load_params("gs://bkt/run", Transformer(exp.model), mesh, exp.rules)  # train.init_from
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), init, params)

  assert cli.main(["ardiff", "export", "--run_dir", "gs://bkt/run", "--to", "params", "--out",
                   "gs://bkt/exported"]) == 0, capsys.readouterr().err
  assert {"model_config.json", "config.json", "params.safetensors"} <= _files(bucket / "bkt" / "exported")
  _, _, exported = train_main.load_run("gs://bkt/exported")  # a params directory read back from the URL
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), exported, params)

  assert os.listdir(cwd) == []  # no ./gs: directory
  assert not [p for p in _files(tmp_path) if "gs:" in p], [p for p in _files(tmp_path) if "gs:" in p]


def test_a_dataset_prepared_in_a_bucket_is_found_there(bucket):
  from ardiff.data import shakespeare
  path = shakespeare.builder_dir("gs://bkt/data")
  assert path == f"gs://bkt/data/{shakespeare.BUILDER_NAME}/{shakespeare.VERSION}"  # never made a local path
  assert not shakespeare._is_prepared(path)
  version_dir = bucket / "bkt" / "data" / shakespeare.BUILDER_NAME / shakespeare.VERSION
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text("{}")
  assert shakespeare._is_prepared(path)  # so `ardiff train` does not prepare it again


def test_stablehlo_serving_refuses_a_url_instead_of_writing_a_local_gs_directory(tmp_path, monkeypatch):
  from ardiff.config import ModelConfig
  from ardiff.export import stablehlo
  monkeypatch.chdir(tmp_path)
  cfg = ModelConfig(vocab_size=16, embed_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
  with pytest.raises(ValueError, match="gs://bkt/serving is a URL.*--to stablehlo --out URL"):
    stablehlo.export_serving(None, cfg, "gs://bkt/serving", max_len=8, prompt_len=4, block_size=None)
  with pytest.raises(ValueError, match="gs://bkt/serving is a URL.*copy the export to a local directory"):
    stablehlo.load_serving("gs://bkt/serving")
  assert os.listdir(tmp_path) == []  # before: ./gs:/bkt/serving
