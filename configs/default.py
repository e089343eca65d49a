"""Default experiment: byte-level BD3-LM (block size 4) on Shakespeare, ~0.9M params, a few minutes on a CPU.

Launch:  python -m ardiff train                      (this file is the default)
         python -m ardiff train --config configs/default.py --config.train.num_steps=1000
"""

from ardiff.experiment import base_config


def get_config():
  return base_config()
