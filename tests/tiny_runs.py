"""The tiny byte-level block-diffusion experiment that the run-directory tests (faults, URL run dirs) train."""

from ardiff import experiment


def tiny_config(run_dir, data_dir, **train):
  """Byte tokenizer (vocab 260, [MASK] = 258), 2 layers of width 32, block size 8, sequence 32, batch 8, no samples;
  ``train`` overrides more ``train`` fields."""
  c = experiment.base_config()
  c.model.update(vocab_size=260, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                 mask_token_id=258)
  c.objective.update(kind="block_diffusion", block_size=8)
  c.data.update(seq_len=32, data_dir=data_dir)
  c.train.update(run_dir=str(run_dir), batch_size=8, eval_batches=1, num_samples=0, **train)
  c.optimizer.warmup_steps = 1
  return c
