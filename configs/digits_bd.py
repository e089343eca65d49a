"""Class-conditional block diffusion (BD3) on sklearn's 8x8 digits: 17 grey levels as tokens, a block = one pixel
row (8 tokens), the text backbone and objective unchanged. 400 steps of 32 images (4,608 tokens of the 2L sequence
a step, about the default text run's 4,096, for 4/3 of its steps): minutes on a laptop CPU. The end of the run writes
``runs/digits_bd/samples.png`` (one row per digit class) and the eval reports bits per dimension (``bits_per_token``).

Launch:  python -m ardiff train --config configs/digits_bd.py
         python -m ardiff sample --checkpoint runs/digits_bd            (writes runs/digits_bd/samples.png)
Options: configs/digits_bd.py:family=ar|mdlm|bd3,block_rows=K,order=raster|patch   (order=patch: a block is one
         2x2 patch when block_rows=0, i.e. 4 tokens)
"""

from ardiff.experiment import parse_config_args
from ardiff.images.experiment import image_base_config

ARGS = {"family": "bd3", "block_rows": 1, "order": "raster"}


def get_config(arg=None):
  args = parse_config_args(arg, ARGS, "configs/digits_bd.py")
  block = 8 * args["block_rows"] if args["block_rows"] else 4
  c = image_base_config(family=args["family"], block_size=block, dataset="digits", levels=17, order=args["order"],
                        patch_size=2)
  tag = args["family"] + (f"_b{block}" if args["family"] == "bd3" and block != 8 else "")
  c.name = f"digits_{tag}"
  c.train.run_dir = "runs/digits_bd" if tag == "bd3" else f"runs/digits_{tag}"
  c.train.batch_size = 32
  c.train.num_steps = 400
  c.train.eval_every = 200
  c.train.save_every = 200
  c.train.eval_batches = 9  # the whole 297-image test split (9 batches of 32)
  c.optimizer.warmup_steps = 50
  return c
