"""A ~1B-parameter BD3-LM (block size 16) for a TPU pod: Llama-1B-like shapes, bf16 compute, FSDP x tensor
mesh, dots remat, Pallas kernels, a 32k SentencePiece/HF vocabulary plus [MASK], sequence 2048, TFDS data on GCS.

Check that it compiles and fits before paying for the pod:
  python -m ardiff compile --config configs/bd3_1b_tpu.py --topology v5p:8x8x8
Launch on every host of a TPU VM (see launch/tpu_vm.sh):
  python -m ardiff train --config configs/bd3_1b_tpu.py --config.data.data_dir=gs://YOUR_BUCKET/tfds
"""

from ardiff.experiment import base_config


def get_config():
  c = base_config()
  c.name = "bd3_1b_tpu"
  c.model.vocab_size = 32768
  c.model.mask_token_id = 32767
  c.model.embed_dim = 2048
  c.model.num_layers = 16
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 64
  c.model.mlp_dim = 8192
  c.model.rope_theta = 500000.0
  c.model.tie_embeddings = True
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "dots_no_batch"
  c.model.attention_impl = "auto"
  c.objective.block_size = 16
  c.data.name = "c4"
  c.data.text_key = "text"
  c.data.tokenizer = "sentencepiece:/path/to/tokenizer.model"
  c.data.seq_len = 2048
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 4
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.1
  c.optimizer.ema_decay = 0.9999
  c.train.batch_size = 512
  c.train.num_steps = 100000
  c.train.eval_every = 2000
  c.train.save_every = 1000
  c.train.run_dir = "gs://YOUR_BUCKET/runs/bd3_1b"
  return c
