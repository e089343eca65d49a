"""BD3-LM on Shakespeare bytes: exact 2L training over [x_t ; x_0], NELBO (1/t) weights; the block size is the
argument (default 4; it must divide data.seq_len = 128).

Launch:  python -m ardiff train --config configs/bd3.py                  (block size 4, runs/bd3_b4)
         python -m ardiff train --config configs/bd3.py:block_size=8     (runs/bd3_b8; 16 -> runs/bd3_b16)
"""

from ardiff.experiment import base_config, parse_config_args

ARGS = {"block_size": 4}


def get_config(arg=None):
  args = parse_config_args(arg, ARGS, "configs/bd3.py")
  c = base_config()
  c.name = f"bd3_b{args['block_size']}"
  c.objective.block_size = args["block_size"]
  c.train.run_dir = f"runs/bd3_b{args['block_size']}"
  return c
