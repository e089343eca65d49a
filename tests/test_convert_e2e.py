"""AR -> Hugging Face -> block diffusion, end to end at tiny scale, through the CLI entry points.

An AR model trained by ardiff is exported to HF, converted to a block-diffusion run and fine-tuned with
configs/finetune.py:from=DIR; its block-diffusion NELBO must beat the same model and recipe trained from scratch for
the same number of steps. benchmarks/convert_vs_scratch.py runs the same comparison at a larger scale.
"""

import json

import numpy as np
import pytest

from ardiff import cli, experiment
from ardiff.training import main as train_main

AR_STEPS, FT_STEPS, BLOCK = 100, 20, 4
EVAL_BATCHES = 8
MARGIN = 0.5  # nats/token; measured: 3.10 converted vs 4.30 scratch (gap 1.20) on a 2-core CPU


def _tiny(c, run_dir, data_dir, steps):
  c.model.update(embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  c.data.update(seq_len=32, data_dir=data_dir)
  c.mesh.update(data=1, fsdp=1, tensor=1)  # one device: the 8 fake test devices would only add overhead here
  c.train.update(run_dir=str(run_dir), batch_size=8, num_steps=steps, log_every=steps, eval_every=steps,
                 eval_batches=2, save_every=steps, num_samples=0)
  c.optimizer.update(learning_rate=3e-3, warmup_steps=5)
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _nelbo(run_dir):
  return train_main.evaluate_run(str(run_dir), max_batches=EVAL_BATCHES)["nelbo_per_token"]


def test_ar_to_block_diffusion_beats_scratch(tmp_path, data_dir):
  import configs.ar_shakespeare
  import configs.finetune

  ar_dir = tmp_path / "ar"
  train_main.train(_tiny(configs.ar_shakespeare.get_config(), ar_dir, data_dir, AR_STEPS), progress=False)

  hf_dir, bd_dir = tmp_path / "ar_hf", tmp_path / "ar_bd4"
  assert cli.main(["ardiff", "export", "--run_dir", str(ar_dir), "--to", "hf", "--out", str(hf_dir)]) == 0
  hf_cfg = json.load(open(hf_dir / "config.json"))
  assert hf_cfg["ardiff"]["tokenizer"] == "byte" and hf_cfg["ardiff"]["special_tokens"] == {
      "bos": 256, "eos": 257, "mask": 258}
  assert cli.main(["ardiff", "convert", "--from-hf", str(hf_dir), "--to", "block_diffusion", "--block-size",
                   str(BLOCK), "--seq-len", "32", "--out", str(bd_dir)]) == 0
  converted = json.load(open(bd_dir / "config.json"))
  assert converted["objective"]["kind"] == "block_diffusion" and converted["objective"]["block_size"] == BLOCK
  assert converted["model"]["mask_token_id"] == 258 and converted["objective"]["token_shift"]

  ft = configs.finetune.get_config(f"from={bd_dir}")
  assert ft.train.init_from == str(bd_dir)
  ft = _tiny(ft, tmp_path / "ft", data_dir, FT_STEPS)
  train_main.train(ft, progress=False)
  scratch = _tiny(configs.finetune.get_config(f"from={bd_dir}"), tmp_path / "scratch", data_dir, FT_STEPS)
  scratch.train.init_from = ""
  train_main.train(scratch, progress=False)

  nelbo_ft, nelbo_scratch = _nelbo(tmp_path / "ft"), _nelbo(tmp_path / "scratch")
  assert np.isfinite(nelbo_ft) and nelbo_ft + MARGIN < nelbo_scratch, (nelbo_ft, nelbo_scratch)


def test_convert_from_run_keeps_data_and_adds_mask(tmp_path, data_dir):
  """--from-run on an AR run whose byte tokenizer has no [MASK]: the vocabulary grows by one mean-initialised row."""
  import configs.ar_shakespeare
  c = _tiny(configs.ar_shakespeare.get_config(), tmp_path / "ar", data_dir, 2)
  c.optimizer.warmup_steps = 0
  c.data.tokenizer = "byte:bos,eos"
  c.model.update(vocab_size=258, mask_token_id=None)
  experiment.validate(c)
  train_main.train(c, progress=False)
  out = tmp_path / "bd"
  assert cli.main(["ardiff", "convert", "--from-run", str(tmp_path / "ar"), "--block-size", "8", "--recipe", "sdar",
                   "--out", str(out)]) == 0
  exp, _, params = train_main.load_run(str(out))
  assert exp.data.tokenizer == "byte:bos,eos,mask" and exp.data.data_dir == data_dir
  assert exp.model.vocab_size == 259 and exp.model.mask_token_id == 258
  assert (exp.objective.block_size, exp.objective.weighting, exp.objective.token_shift) == (8, "p_mask", False)
  _, _, src = train_main.load_run(str(tmp_path / "ar"))
  emb, old = np.asarray(params["embed_tokens"]["embedding"]), np.asarray(src["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(emb[:258], old)
  np.testing.assert_allclose(emb[258], old.mean(0), rtol=1e-6, atol=1e-7)
  head, old_head = np.asarray(params["lm_head"]["kernel"]), np.asarray(src["lm_head"]["kernel"])
  np.testing.assert_array_equal(head[:, :258], old_head)
  np.testing.assert_allclose(head[:, 258], old_head.mean(1), rtol=1e-6, atol=1e-7)
  assert json.load(open(out / "conversion.json"))["mean_initialised_rows"] == [258]
