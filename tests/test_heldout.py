"""The vendored held-out English corpus (ardiff/data/heldout.py): intact, and cut into BOS-led rows."""

import numpy as np
import pytest

from ardiff.data import heldout
from ardiff.data.tokenizers import ByteTokenizer


def test_heldout_text_is_intact_and_checked(tmp_path):
  text = heldout.read_heldout()
  assert len(text.encode()) == 82518 and text.lstrip().startswith("Mark 1")
  bad = tmp_path / "kjv_mark.txt"
  bad.write_bytes(text.encode().replace(b"Amen", b"Amen!"))
  with pytest.raises(ValueError, match="expected 6bb13b0e.*restore it from git"):
    heldout.read_heldout(str(bad))


def test_heldout_batches_layout():
  tok = ByteTokenizer()
  batches = heldout.heldout_batches(tok, seq_len=8, batch_size=3, text="abcdefghijklmnopqrstuvwxyz0123456789")
  assert len(batches) == 1  # 36 bytes -> 5 rows of 7, one full batch of 3 (the partial one is dropped)
  t = batches[0]["tokens"]
  assert t.shape == (3, 8) and (t[:, 0] == tok.bos_id).all() and (batches[0]["segment_ids"] == 1).all()
  assert bytes(t[:, 1:].ravel().tolist()) == b"abcdefghijklmnopqrstu"
  with pytest.raises(ValueError, match="fewer than batch_size=9"):
    heldout.heldout_batches(tok, seq_len=8, batch_size=9, text="abcdefghijklmnopqrstuvwxyz0123456789")
