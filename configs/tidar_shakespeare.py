"""TiDAR hybrid: AR loss on the clean half + one-step diffusion on an all-[MASK] draft half (block 8).

Launch:  python -m ardiff train --config configs/tidar_shakespeare.py
"""

from ardiff.experiment import base_config


def get_config():
  c = base_config()
  c.name = "tidar_shakespeare"
  c.objective.kind = "tidar"
  c.objective.block_size = 8
  c.objective.tidar_alpha = 1.0
  c.train.run_dir = "runs/tidar_shakespeare"
  return c
