"""`python -m ardiff sample` on a run trained by the training system: every sampler, run in-process."""

import os
import re
import time

import pytest

from ardiff import cli
from ardiff.data.tokenizers import make_tokenizer

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
  stats = re.search(r"sampler=(\w+) samples=(\d+) new_tokens_total=(\d+) time=\S+ tokens_per_s_total=([\d.]+) "
                    r"NFE=(\d+) new_tokens_per_sample=(\d+) tokens_per_forward_per_sample=([\d.]+)", out)
  assert stats, out
  expected = {"auto": "tidar"}.get(argv[1], argv[1])
  assert stats.group(1) == expected
  samples, total, nfe, per_sample = (int(stats.group(i)) for i in (2, 3, 5, 6))
  assert samples == (2 if "--num_samples" in argv else 1) and float(stats.group(4)) > 0 and nfe >= 1
  # the total counts every sample's new tokens; the per-forward figure is one sample's (the longest) over NFE
  assert 0 < per_sample <= 12 and per_sample <= total <= samples * per_sample
  assert float(stats.group(7)) == pytest.approx(per_sample / nfe, abs=0.01)


def test_sample_cli_speculative_needs_a_drafter(tidar_run, capsys):
  with pytest.raises(ValueError, match="--draft_checkpoint"):
    sample_main.main(["ardiff sample", "--checkpoint", tidar_run, "--sampler", "speculative"])
  assert sample_main.main(["ardiff sample", "--checkpoint", tidar_run, "--sampler", "speculative",
                           "--draft_checkpoint", tidar_run, "--num_tokens", "8", "--temperature", "0"]) == 0
  out = capsys.readouterr().out
  # drafter == target under greedy decoding: every draft is accepted, num_draft + 1 tokens per target forward
  assert "sampler=speculative" in out and "NFE=3" in out, out


def test_sample_cli_diffuspec_needs_a_block_diffusion_drafter(tidar_run):
  with pytest.raises(ValueError, match="--sampler diffuspec needs --draft_checkpoint"):
    sample_main.main(["ardiff sample", "--checkpoint", tidar_run, "--sampler", "diffuspec"])
  with pytest.raises(ValueError, match="is a tidar run; diffuspec drafts with a block-diffusion run"):
    sample_main.main(["ardiff sample", "--checkpoint", tidar_run, "--sampler", "diffuspec", "--draft_checkpoint",
                      tidar_run])


def test_too_long_prompt_is_refused_up_front(tidar_run, capsys):
  # The run's context (data.seq_len) is 32 tokens; BOS + 100 bytes used to run silently (a 14 kB prompt hung).
  start = time.perf_counter()
  rc = cli.main(["ardiff", "sample", "--checkpoint", tidar_run, "--prompt", "x" * 100])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error: the prompt is 101 tokens") and "context is 32 tokens" in err, err
  assert "--truncate_prompt" in err and "Traceback" not in err
  rc = cli.main(["ardiff", "sample", "--checkpoint", tidar_run, "--prompt", "x" * 20, "--num_tokens", "20"])
  err = capsys.readouterr().err
  assert rc == 2 and "(21 tokens, BOS included) plus --num_tokens=20 is 41 tokens" in err, err
  assert "lower --num_tokens to at most 11" in err
  assert time.perf_counter() - start < 30  # refused before any generation


def test_text_tokenizers_refuse_an_undecodable_prompt_clearly():
  class TextTokenizer:  # any tokenizer but the byte one reads text (SentencePiece, HF)
    def __repr__(self):
      return "HFTokenizer('tok.json')"
  assert sample_main.prompt_input(TextTokenizer(), "ROMEO.") == "ROMEO."
  with pytest.raises(ValueError, match=r"--prompt is not valid UTF-8 .*character 3: b'\\xff'.*give a UTF-8 prompt"):
    sample_main.prompt_input(TextTokenizer(), os.fsdecode(b"ROM\xffEO."))


def test_fit_prompt_rules():
  ids = [256] + list(range(40))
  kept, n, note = sample_main.fit_prompt(ids, context=32, num_tokens=None, truncate=10, bos_id=256)
  assert kept == [256] + list(range(31, 40)) and n == 22 and "kept BOS and its last 9" in note
  kept, n, note = sample_main.fit_prompt(ids[:5], context=32, num_tokens=None, truncate=None, bos_id=256)
  assert kept == ids[:5] and n == 27 and note is None  # default: fill the context
  with pytest.raises(ValueError, match=r"--truncate_prompt=32 must lie in \[1, 31\]"):
    sample_main.fit_prompt(ids, context=32, num_tokens=None, truncate=32, bos_id=256)
  with pytest.raises(ValueError, match="--num_tokens=0 must be >= 1"):
    sample_main.fit_prompt(ids[:5], context=32, num_tokens=0, truncate=None, bos_id=256)


def test_non_utf8_prompt_and_truncate_prompt(tidar_run, capsys):
  """Raw bytes reach the byte tokenizer; --truncate_prompt keeps the last tokens and says so (one generation)."""
  # What Python puts in argv for `--prompt $'...ROM\\xff\\xfeEO.'`: the undecodable bytes as lone surrogates.
  prompt = os.fsdecode(b"a" * 50 + b"ROM\xff\xfeEO.")
  assert sample_main.prompt_input(make_tokenizer("byte"), prompt) == b"a" * 50 + b"ROM\xff\xfeEO."
  assert cli.main(["ardiff", "sample", "--checkpoint", tidar_run, "--prompt", prompt, "--truncate_prompt", "10",
                   "--num_tokens", "4", "--sampler", "ar", "--no-warmup"]) == 0
  out, err = capsys.readouterr()
  assert "note: --truncate_prompt=10: the prompt has 59 tokens; kept BOS and its last 9." in err, err
  assert out.startswith("aROM\ufffd\ufffdEO."), out  # printed with replacement characters
  assert "warm-up" not in err and "compilation included" in out


def test_sampler_and_drafter_kinds_are_checked(tidar_run, tmp_path, capsys):
  """A block-diffusion run is no speculative drafter (one clear error); decoding a run with a sampler of another
  family works but says so on stderr."""
  import json
  import shutil
  bd_run = str(tmp_path / "bd")
  shutil.copytree(tidar_run, bd_run)  # the same weights, recorded as a block-diffusion run
  cfg_path = os.path.join(bd_run, "config.json")
  cfg = json.load(open(cfg_path))
  cfg["objective"]["kind"] = "block_diffusion"
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(ValueError, match="is a block_diffusion run; speculative decoding drafts with a causal LM"):
    sample_main.main(["ardiff sample", "--checkpoint", tidar_run, "--sampler", "speculative", "--draft_checkpoint",
                      bd_run])
  capsys.readouterr()
  assert sample_main.main(["ardiff sample", "--checkpoint", bd_run, "--sampler", "ar", "--num_tokens", "4",
                           "--no-warmup"]) == 0
  assert "is a block_diffusion run, not trained for --sampler ar's mask" in capsys.readouterr().err
  assert sample_main.main(["ardiff sample", "--checkpoint", tidar_run, "--sampler", "ar", "--num_tokens", "4",
                           "--no-warmup"]) == 0
  assert "note:" not in capsys.readouterr().err
