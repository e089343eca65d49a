"""SDAR recipe: continue training an AR checkpoint as block diffusion with block size 4, 1/p_mask weights,
no token shift, the whole sequence noised.

Launch (after training configs/ar_shakespeare.py):
  python -m ardiff train --config configs/sdar_finetune.py --config.train.init_from=runs/ar_shakespeare
"""

from ardiff.experiment import base_config


def get_config():
  c = base_config()
  c.name = "sdar_finetune"
  c.objective.block_size = 4
  c.objective.weighting = "p_mask"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 10
  c.train.num_steps = 300
  c.train.init_from = "runs/ar_shakespeare"
  c.train.run_dir = "runs/sdar_finetune"
  return c
