"""`python -m ardiff train` -> `python -m ardiff sample` on image runs (in-process, tiny models): a discrete BD3
run through the text trainer and a continuous ACDiT run each write a PNG grid of the right size."""

import json
import os

import matplotlib.image
import pytest

from ardiff import cli

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py

TINY = ["--config.model.embed_dim=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
        "--config.train.batch_size=8", "--config.train.num_steps=2", "--config.optimizer.warmup_steps=1",
        "--config.train.eval_every=2", "--config.train.eval_batches=1", "--config.train.num_samples=0",
        "--config.train.log_every=1", "--config.train.save_every=2"]


def _png_shape(path):
  return matplotlib.image.imread(path).shape[:2]


def test_discrete_digits_train_then_sample(tmp_path, capsys):
  run = tmp_path / "bd"
  assert cli.main(["ardiff", "train", "--config", "configs/digits_bd.py", f"--config.train.run_dir={run}",
                   "--noprogress", *TINY]) == 0
  evals = [json.loads(line) for line in open(run / "metrics.jsonl") if "eval/bits_per_token" in line]
  assert evals and 0 < evals[-1]["eval/bits_per_token"] < 10 and "eval/bits_per_byte" not in evals[-1]
  out = tmp_path / "grid" / "two.png"
  assert cli.main(["ardiff", "sample", "--checkpoint", str(run), "--num_samples", "2", "--steps_per_block", "2",
                   "--no-warmup", "--out", str(out)]) == 0
  assert _png_shape(out) == (10 * 33 + 1, 2 * 33 + 1)  # 10 classes x 2, 8x8 digits drawn 32x32 + 1px borders
  printed = capsys.readouterr().out
  assert str(out) in printed and "images_per_s=" in printed


def test_continuous_acdit_train_then_sample(tmp_path, capsys):
  run = tmp_path / "acdit"
  assert cli.main(["ardiff", "train", "--config", "configs/fashion_acdit.py:dataset=digits",
                   f"--config.train.run_dir={run}", "--config.image.denoise_steps=2", *TINY]) == 0
  assert os.path.isdir(run / "checkpoints") and (run / "config.json").exists()
  config = json.loads((run / "config.json").read_text())
  config["train"]["num_samples"] = 3  # without --num_samples the grid has the run's train.num_samples per class
  (run / "config.json").write_text(json.dumps(config))
  assert cli.main(["ardiff", "sample", "--checkpoint", str(run), "--steps_per_block", "2", "--cfg_scale", "1.5",
                   "--no-warmup"]) == 0
  assert _png_shape(run / "samples.png") == (10 * 33 + 1, 3 * 33 + 1)
