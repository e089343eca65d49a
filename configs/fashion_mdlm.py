"""Class-conditional masked diffusion (MDLM: one bidirectional block) model of Fashion-MNIST as 16 grey-level tokens of
14x14 mean-pooled images (196 pixel tokens after one class token), through the text backbone and objective. Needs
the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist).

Launch:  python -m ardiff train --config configs/fashion_mdlm.py
         python -m ardiff sample --checkpoint runs/fashion_mdlm              (writes runs/fashion_mdlm/samples.png)
"""

from ardiff.images.experiment import image_base_config


def get_config():
  c = image_base_config(family="mdlm", dataset="fashion_mnist", size=14, levels=16)
  c.name = "fashion_mdlm"
  c.train.run_dir = "runs/fashion_mdlm"
  c.model.embed_dim, c.model.mlp_dim = 128, 512
  c.train.batch_size = 128
  c.train.num_steps = 3000
  c.train.eval_every = 1000
  c.train.save_every = 500
  c.train.eval_batches = 16
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  return c
