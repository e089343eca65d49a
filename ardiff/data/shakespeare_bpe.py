"""The default run's tokenizer: a 1024-id byte-level BPE of the embedded Shakespeare corpus's training split,
vendored at ``ardiff/data/corpora/shakespeare_bpe1024.json`` (20 KB) so the default run stays offline and needs no
tokenizer step.

Why a subword default: at the default run's budget (300 steps, ~0.9 M parameters, 2 CPU cores) a byte-level model
still spells most words wrong (issue 16 measured 35% real words); with 1024 subwords most tokens are whole words or
frequent word pieces, and each 128-token row holds ~2.4x more text. The measured comparison is in docs/results.md
("Default run").

Rebuild (deterministic: the ``tokenizers`` BPE trainer on the 40 training files, whole, in sorted order):
``python -m ardiff.data.shakespeare_bpe --check`` retrains and compares with the vendored file byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import sys

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora", "shakespeare_bpe1024.json")
BPE_SHA256 = "2ff9bd763d976c9a89f9a26184f78dea3efd9c3d50f1bc8e3edb53adc6a22f3f"
VOCAB_SIZE = 1024
MASK_ID = 3  # ardiff.data.tokenizer_train.SPECIALS: <pad> 0, <s> 1, </s> 2, [MASK] 3
SPEC = "hf:" + BPE_PATH


def train() -> str:
  """The tokenizer's JSON, retrained from the vendored corpus (~10 s)."""
  from ardiff.data import shakespeare
  from ardiff.data.tokenizer_train import train_tokenizer
  files = shakespeare.read_corpus_files()[:-shakespeare.NUM_VALIDATION_FILES]
  return train_tokenizer([d.decode("utf-8") for _, d in files], vocab_size=VOCAB_SIZE).to_str()


def main(argv) -> int:
  if argv[1:] != ["--check"]:
    print(f"usage: python -m ardiff.data.shakespeare_bpe --check   (retrains; compares with {BPE_PATH})")
    return 2
  digest = hashlib.sha256(train().encode()).hexdigest()
  ok = digest == BPE_SHA256 == hashlib.sha256(open(BPE_PATH, "rb").read()).hexdigest()
  print(f"retrained sha256 {digest}: {'identical to' if ok else 'DIFFERS from'} the vendored {BPE_PATH}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
