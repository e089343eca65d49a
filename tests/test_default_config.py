"""The vendored Shakespeare BPEs (ardiff/data/shakespeare_bpe.py) and the default config (configs/default.py) that
uses the 8192-id one; the byte-level variant (configs/default_byte.py)."""

import hashlib

import pytest

from ardiff import experiment
from ardiff.data import shakespeare_bpe
from ardiff.data.tokenizers import make_tokenizer, token_byte_lengths
from configs import default, default_byte


@pytest.mark.parametrize("vocab_size", sorted(shakespeare_bpe.SHA256))
def test_vendored_bpes_are_intact_and_round_trip(vocab_size):
  path = shakespeare_bpe.path(vocab_size)
  assert hashlib.sha256(open(path, "rb").read()).hexdigest() == shakespeare_bpe.SHA256[vocab_size]
  tok = make_tokenizer(shakespeare_bpe.spec(vocab_size))
  assert (tok.vocab_size, tok.mask_id, tok.bos_id, tok.eos_id) == (vocab_size, 3, 1, 2)
  text = "ROMEO.\nBut soft, what light through yonder window breaks?\n"
  ids = tok.encode(text)
  assert tok.decode(ids) == text and len(ids) < len(text) / 2  # whole words and pieces, not bytes
  assert token_byte_lengths(tok)[ids].sum() == len(text.encode())  # so evaluation reports bits per byte
  with pytest.raises(ValueError, match="no vendored Shakespeare BPE of 2048 ids"):
    shakespeare_bpe.path(2048)


def test_default_config_uses_the_vendored_8192_bpe():
  exp = experiment.validate(default.get_config())  # validation opens the tokenizer and checks vocab and [MASK]
  assert exp.data.tokenizer == shakespeare_bpe.SPEC and (default.BPE_PATH, default.VOCAB_SIZE, default.MASK_ID) == (
      shakespeare_bpe.BPE_PATH, shakespeare_bpe.VOCAB_SIZE, shakespeare_bpe.MASK_ID)
  assert exp.objective.kind == "block_diffusion" and exp.objective.block_size == 4
  assert exp.train.run_dir == "runs/default" and exp.train.num_steps == default.NUM_STEPS


def test_byte_variant_differs_only_in_tokens_and_budget():
  byte, bpe = default_byte.get_config(), default.get_config()
  assert byte.data.tokenizer == "byte" and byte.model.vocab_size == 259 and byte.train.run_dir == "runs/default_byte"
  for section in ("objective", "optimizer"):
    assert byte[section].to_dict() == bpe[section].to_dict()
  same = lambda c: {k: v for k, v in c.model.to_dict().items() if k not in ("vocab_size", "mask_token_id")}
  assert same(byte) == same(bpe)
