"""The default run with a subword tokenizer (issue 16's word-share lever): BD3-LM (block size 4) on Shakespeare, the
default backbone and budget (300 steps), but tokens from the vendored 1024-id byte-level BPE of the corpus's training
split (ardiff/data/shakespeare_bpe.py) instead of bytes. Measured against the byte default in docs/results.md
("Default run").

Launch:  python -m ardiff train --config configs/default_bpe.py
         python -m ardiff sample --checkpoint runs/default_bpe          (decodes with the same vendored file)
"""

import os

import ardiff
from ardiff.experiment import base_config

# ardiff.data.shakespeare_bpe's BPE_PATH / VOCAB_SIZE / MASK_ID (not imported: ardiff.data pulls in TFDS and grain,
# and config files stay cheap to load; tests/test_default_bpe.py checks that both say the same)
BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(ardiff.__file__)), "data", "corpora",
                        "shakespeare_bpe1024.json")
VOCAB_SIZE, MASK_ID = 1024, 3


def get_config():
  c = base_config()
  c.name = "bd3_shakespeare_b4_bpe1024"
  c.data.tokenizer = "hf:" + BPE_PATH
  c.model.vocab_size = VOCAB_SIZE
  c.model.mask_token_id = MASK_ID
  c.train.run_dir = "runs/default_bpe"
  return c
