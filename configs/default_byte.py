"""The byte-level variant of the default run: the same BD3-LM (block size 4) and backbone on Shakespeare bytes
(vocabulary 259: 256 bytes + BOS, EOS, [MASK]), 300 steps. It was the default until issue 16 measured its samples:
35-38% real words after 300 steps, against > 80% for the subword default (docs/results.md, "Default run").

Launch:  python -m ardiff train --config configs/default_byte.py
"""

from ardiff.experiment import base_config


def get_config():
  c = base_config()
  c.name = "bd3_shakespeare_b4_byte"
  c.train.run_dir = "runs/default_byte"
  return c
