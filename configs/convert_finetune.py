"""Fine-tune a converted AR model (a run directory written by `ardiff convert`) as block diffusion.

The model, tokenizer, [MASK] id, block size and objective recipe (`convert --recipe`, default Fast-dLLM v2: token
shift, complementary masks, unweighted CE; docs/algorithms.md §6) come from the converted directory when it is
passed after the file name (`configs/convert_finetune.py:DIR`). This file adds the fine-tuning schedule: a short warmup and a
cosine decay from a peak learning rate of 1e-3. Without `:DIR` it expects the Shakespeare path below.

Launch (AR on Shakespeare -> HF export -> block diffusion, B = 4):
  python -m ardiff train --config configs/ar_shakespeare.py
  python -m ardiff export --run_dir runs/ar_shakespeare --to hf --out exports/ar_shakespeare_hf
  python -m ardiff convert --from-hf exports/ar_shakespeare_hf --to block_diffusion --block-size 4 \
      --out runs/ar_shakespeare_bd4
  python -m ardiff train --config configs/convert_finetune.py:runs/ar_shakespeare_bd4
(or convert the run directly: `python -m ardiff convert --from-run runs/ar_shakespeare --block-size 4 --out ...`).
The fine-tuned run is written to DIR_ft; override with --config.train.run_dir=...
"""

import json
import os

import ml_collections

from ardiff.experiment import base_config

DEFAULT_CONVERTED = "runs/ar_shakespeare_bd4"


def _read_run_config(run_dir: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.expanduser(run_dir), "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: pass the directory written by `python -m ardiff convert ... "
                            f"--out DIR` as configs/convert_finetune.py:DIR.")
  with open(path) as f:
    c = ml_collections.ConfigDict(json.load(f))
  c.rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in c.rules)
  if c.objective.kind != "block_diffusion":
    raise ValueError(f"{path} has objective.kind={c.objective.kind!r}; convert the run first with "
                     "`python -m ardiff convert ... --to block_diffusion`.")
  return c


def get_config(converted_dir=None):
  if converted_dir:
    c = _read_run_config(converted_dir)
    c.train.init_from = converted_dir
    c.train.run_dir = converted_dir.rstrip("/") + "_ft"
  else:
    c = base_config()  # the model of configs/ar_shakespeare.py, with the byte tokenizer's [MASK] = 258
    c.objective.block_size = 4
    c.objective.token_shift = True  # = convert's default recipe, fastdllm_v2
    c.objective.complementary_masks = True
    c.objective.weighting = "none"
    c.train.init_from = DEFAULT_CONVERTED
    c.train.run_dir = DEFAULT_CONVERTED + "_ft"
  c.name = "convert_finetune"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 10
  c.train.num_steps = 300
  c.train.resume = True
  return c
