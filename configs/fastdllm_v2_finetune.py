"""Fast-dLLM v2 recipe: fine-tune an AR checkpoint into a block-diffusion model (token shift, complementary
masks, no loss weights, p_mask = (1-eps) t + eps), low learning rate, short warmup.

Launch (after training configs/ar_shakespeare.py):
  python -m ardiff train --config configs/fastdllm_v2_finetune.py --config.train.init_from=runs/ar_shakespeare
"""

from ardiff.experiment import base_config


def get_config():
  c = base_config()
  c.name = "fastdllm_v2_finetune"
  c.objective.block_size = 8
  c.objective.token_shift = True
  c.objective.complementary_masks = True
  c.objective.weighting = "none"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 10
  c.train.num_steps = 300
  c.train.init_from = "runs/ar_shakespeare"
  c.train.run_dir = "runs/fastdllm_v2_finetune"
  return c
