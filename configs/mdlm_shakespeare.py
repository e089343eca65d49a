"""MDLM: masked diffusion over the whole sequence (block size = sequence length, bidirectional).

Launch:  python -m ardiff train --config configs/mdlm_shakespeare.py
"""

from ardiff.experiment import base_config


def get_config():
  c = base_config()
  c.name = "mdlm_shakespeare"
  c.objective.block_size = c.data.seq_len
  c.train.run_dir = "runs/mdlm_shakespeare"
  return c
