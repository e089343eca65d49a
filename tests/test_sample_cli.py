"""`python -m ardiff sample` on a run trained by the training system: every sampler, run in-process."""

import re

import pytest

from ardiff.sampling import main as sample_main
from ardiff.training.main import train
from configs import tidar_shakespeare


pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py

@pytest.fixture(scope="module")
def tidar_run(tmp_path_factory):
  """A tiny TiDAR run: its causal half is an AR model and its [MASK] id makes every sampler applicable."""
  c = tidar_shakespeare.get_config()
  c.model.update(embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  c.objective.block_size = 4
  c.data.seq_len = 32
  c.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.train.update(run_dir=str(tmp_path_factory.mktemp("run")), batch_size=8, num_steps=4, eval_every=4,
                 eval_batches=1, save_every=4, num_samples=0)
  c.optimizer.warmup_steps = 1
  train(c, progress=False)
  return c.train.run_dir


@pytest.mark.parametrize("argv", [
    ["--sampler", "auto"],  # TiDAR draft+verify
    ["--sampler", "ar", "--temperature", "0"],
    ["--sampler", "block_diffusion", "--strategy", "threshold", "--threshold", "0.5", "--kv_write", "separate"],
    ["--sampler", "block_diffusion", "--strategy", "dynamic", "--sub_block_size", "2", "--num_samples", "2"],
])
def test_sample_cli_prints_samples_and_speed(tidar_run, capsys, argv):
  assert sample_main.main(["ardiff sample", "--checkpoint", tidar_run, "--num_tokens", "12", *argv]) == 0
  out = capsys.readouterr().out
  assert out.startswith("ROMEO.\n")  # the prompt, then the sample (the byte tokenizer decodes BOS to nothing)
  stats = re.search(r"sampler=(\w+) tokens=(\d+) .*tokens/s=([\d.]+) NFE=(\d+) tokens/forward=([\d.]+)", out)
  assert stats, out
  expected = {"auto": "tidar"}.get(argv[1], argv[1])
  assert stats.group(1) == expected
  assert int(stats.group(2)) > 0 and float(stats.group(3)) > 0 and int(stats.group(4)) >= 1


def test_sample_cli_speculative_needs_a_drafter(tidar_run, capsys):
  with pytest.raises(SystemExit, match="--draft_checkpoint"):
    sample_main.main(["ardiff sample", "--checkpoint", tidar_run, "--sampler", "speculative"])
  assert sample_main.main(["ardiff sample", "--checkpoint", tidar_run, "--sampler", "speculative",
                           "--draft_checkpoint", tidar_run, "--num_tokens", "8", "--temperature", "0"]) == 0
  out = capsys.readouterr().out
  # drafter == target under greedy decoding: every draft is accepted, num_draft + 1 tokens per target forward
  assert "sampler=speculative" in out and "NFE=3" in out, out
