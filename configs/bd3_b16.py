"""BD3-LM with block size 16 on Shakespeare bytes: exact 2L training over [x_t ; x_0], NELBO (1/t) weights.

Launch:  python -m ardiff train --config configs/bd3_b16.py
"""

from ardiff.experiment import base_config


def get_config():
  c = base_config()
  c.name = "bd3_b16"
  c.objective.block_size = 16
  c.train.run_dir = "runs/bd3_b16"
  return c
