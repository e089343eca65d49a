"""ACDiT on Fashion-MNIST: continuous 2x2 patches of 14x14 images (mean-pooled; 49 patches), blockwise
autoregression over blocks of one patch row (7 patches) with rectified flow inside each block, adaLN time and
class conditioning, classifier-free guidance (label dropout 0.1, scale 2). Needs the Debian package
dataset-fashion-mnist (apt-get install dataset-fashion-mnist).

Launch:  python -m ardiff train --config configs/fashion_acdit.py
         python -m ardiff sample --checkpoint runs/fashion_acdit            (writes runs/fashion_acdit/samples.png)
Options: configs/fashion_acdit.py:block_rows=K (K patch rows per block; 7 = the whole image = a plain DiT),
         dataset=digits (8x8 digits, 16 patches, a CPU smoke run), size=28 (full resolution, 196 patches),
         dataset=mnist|kmnist|cifar10 (prepared TFDS datasets: --config.image.data_dir=TFDS_DIR); Fashion-MNIST
         through TFDS: python -m ardiff images prepare --data_dir DIR, then --config.image.source=tfds
         --config.image.data_dir=DIR
"""

from ardiff.experiment import parse_config_args
from ardiff.images.experiment import image_base_config
from ardiff.sections import IMAGE_DATASETS

ARGS = {"block_rows": 1, "dataset": "fashion_mnist", "size": 14}


def get_config(arg=None):
  args = parse_config_args(arg, ARGS, "configs/fashion_acdit.py")
  size = 0 if args["dataset"] == "digits" else args["size"]
  side = size or IMAGE_DATASETS.get(args["dataset"], 8)  # an unknown name: ImageConfig's check names it
  per_row = side // 2
  c = image_base_config(family="acdit", block_size=per_row * args["block_rows"], dataset=args["dataset"], size=size,
                        source="files" if args["dataset"] in ("digits", "fashion_mnist") else "tfds", patch_size=2,
                        label_dropout=0.1, cfg_scale=2.0, denoise_steps=16)
  tag = "" if args["block_rows"] == 1 else f"_r{args['block_rows']}"
  c.name = f"{args['dataset']}_acdit{tag}"
  c.train.run_dir = f"runs/{c.name}"
  c.model.embed_dim, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 128, 4, 4, 4
  c.model.head_dim, c.model.mlp_dim = 32, 512
  c.train.batch_size = 64
  c.train.num_steps = 3000
  c.train.eval_every = 1000
  c.train.save_every = 500
  c.train.eval_batches = 8
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0
  c.optimizer.warmup_steps = 100
  return c
