"""The vendored Shakespeare BPE (ardiff/data/shakespeare_bpe.py) and configs/default_bpe.py that uses it."""

import hashlib

from ardiff import experiment
from ardiff.data import shakespeare_bpe
from ardiff.data.tokenizers import make_tokenizer
from configs import default_bpe


def test_vendored_bpe_is_intact_and_round_trips():
  assert hashlib.sha256(open(shakespeare_bpe.BPE_PATH, "rb").read()).hexdigest() == shakespeare_bpe.BPE_SHA256
  tok = make_tokenizer(shakespeare_bpe.SPEC)
  assert (tok.vocab_size, tok.mask_id, tok.bos_id, tok.eos_id) == (shakespeare_bpe.VOCAB_SIZE, 3, 1, 2)
  text = "ROMEO.\nBut soft, what light through yonder window breaks?\n"
  ids = tok.encode(text)
  assert tok.decode(ids) == text and len(ids) < len(text) / 2  # whole words and pieces, not bytes


def test_default_bpe_config_uses_the_vendored_tokenizer():
  exp = experiment.validate(default_bpe.get_config())  # validation opens the tokenizer and checks vocab and [MASK]
  assert exp.data.tokenizer == shakespeare_bpe.SPEC and (default_bpe.BPE_PATH, default_bpe.VOCAB_SIZE,
                                                          default_bpe.MASK_ID) == (
      shakespeare_bpe.BPE_PATH, shakespeare_bpe.VOCAB_SIZE, shakespeare_bpe.MASK_ID)
  assert exp.objective.kind == "block_diffusion" and exp.objective.block_size == 4
