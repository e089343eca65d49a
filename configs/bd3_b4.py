"""BD3-LM with block size 4 on Shakespeare bytes: exact 2L training over [x_t ; x_0], NELBO (1/t) weights.

Launch:  python -m ardiff train --config configs/bd3_b4.py
"""

from ardiff.experiment import base_config


def get_config():
  c = base_config()
  c.name = "bd3_b4"
  c.objective.block_size = 4
  c.train.run_dir = "runs/bd3_b4"
  return c
