"""The default run's tokenizer: byte-level BPEs of the embedded Shakespeare corpus's training split, vendored under
``ardiff/data/corpora/`` so the default run stays offline and needs no tokenizer step.

* ``shakespeare_bpe8192.json`` (8192 ids, 223 KB): the tokenizer of ``configs/default.py``;
* ``shakespeare_bpe1024.json`` (1024 ids, 20 KB): the earlier subword lever, kept so its rows in docs/results.md
  ("Default run") can be re-measured (``benchmarks/default_run.py``).

Why a subword default: at the default run's budget (a few minutes, ~0.9 M parameters, 2 CPU cores) a byte-level
model still spells most words wrong (issue 16 measured 35-38% real words); with 8192 subwords most words are one
token each, so a sample's words are mostly real (measured ~79%), and each 128-token row holds ~3.2x more text
(0.31 tokens per byte). The measured comparison is in docs/results.md ("Default run").

Rebuild (deterministic: the ``tokenizers`` BPE trainer on the 40 training files, whole, in sorted order):
``python -m ardiff.data.shakespeare_bpe --check`` retrains both and compares with the vendored files byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import sys

CORPORA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora")
# vocab size -> sha256 of the vendored file
SHA256 = {8192: "6652519601ac11ff18d7b39e63e3a79f47f084a703cf943b6fd0f2d7d7f39512",
          1024: "2ff9bd763d976c9a89f9a26184f78dea3efd9c3d50f1bc8e3edb53adc6a22f3f"}
VOCAB_SIZE = 8192  # the default run's
MASK_ID = 3  # ardiff.data.tokenizer_train.SPECIALS: <pad> 0, <s> 1, </s> 2, [MASK] 3 (both files)


def path(vocab_size: int = VOCAB_SIZE) -> str:
  if vocab_size not in SHA256:
    raise ValueError(f"no vendored Shakespeare BPE of {vocab_size} ids; vendored: {sorted(SHA256)}.")
  return os.path.join(CORPORA, f"shakespeare_bpe{vocab_size}.json")


def spec(vocab_size: int = VOCAB_SIZE) -> str:
  """The ``data.tokenizer`` value of the vendored BPE of ``vocab_size`` ids."""
  return "hf:" + path(vocab_size)


BPE_PATH, SPEC = path(), spec()


def train(vocab_size: int = VOCAB_SIZE) -> str:
  """The tokenizer's JSON, retrained from the vendored corpus (~2 s)."""
  from ardiff.data import shakespeare
  from ardiff.data.tokenizer_train import train_tokenizer
  files = shakespeare.read_corpus_files()[:-shakespeare.NUM_VALIDATION_FILES]
  return train_tokenizer([d.decode("utf-8") for _, d in files], vocab_size=vocab_size).to_str()


def main(argv) -> int:
  if argv[1:] != ["--check"]:
    print(f"usage: python -m ardiff.data.shakespeare_bpe --check   (retrains; compares with the files in {CORPORA})")
    return 2
  ok = True
  for size, want in SHA256.items():
    digest = hashlib.sha256(train(size).encode()).hexdigest()
    same = digest == want == hashlib.sha256(open(path(size), "rb").read()).hexdigest()
    print(f"{size} ids: retrained sha256 {digest}: {'identical to' if same else 'DIFFERS from'} {path(size)}")
    ok &= same
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
