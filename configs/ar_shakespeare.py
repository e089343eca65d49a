"""Byte-level AR baseline (Llama-style, causal) on Shakespeare; the yardstick for perplexity and tokens/s.

Launch:  python -m ardiff train --config configs/ar_shakespeare.py
"""

from ardiff.experiment import base_config


def get_config():
  c = base_config()
  c.name = "ar_shakespeare"
  c.objective.kind = "ar"
  c.train.run_dir = "runs/ar_shakespeare"
  return c
