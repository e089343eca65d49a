"""``ardiff data tokenizer``: trains a byte-level BPE or unigram tokenizer (the ``tokenizers`` library) on a
prepared dataset and saves it as one ``tokenizer.json``.

The vocabulary starts with the reserved specials, in this order: ``<pad>`` = 0, ``<s>`` (BOS) = 1, ``</s>`` (EOS)
= 2, ``[MASK]`` = 3 (unigram adds ``<unk>`` = 4, which byte-level input never produces). These are names that
:class:`ardiff.data.tokenizers.HFTokenizer` recognises, so ``--config.data.tokenizer=hf:tok.json`` finds BOS, EOS,
PAD and the [MASK] id of block diffusion in the file itself (no virtual ids). Byte-level pre-tokenization makes
every input encodable and ``decode(encode(text)) == text`` exactly.

Training reads a seeded sample of the ``train`` split, documents in a random order until ``max_bytes`` of text.
"""

from __future__ import annotations

import time

import numpy as np
from etils import epath

__all__ = ["SPECIALS", "KINDS", "train_tokenizer", "sample_texts"]

SPECIALS = ("<pad>", "<s>", "</s>", "[MASK]")
KINDS = ("bpe", "unigram")


def sample_texts(data_dir: str, *, split: str = "train", max_bytes: int = 100 << 20, seed: int = 0,
                 field: str = "text") -> list[str]:
  """Up to ``max_bytes`` of text from ``split`` of a prepared dataset, documents in a seeded random order."""
  import tensorflow_datasets as tfds
  path = epath.Path(data_dir).expanduser()
  if not (path / "dataset_info.json").exists():
    raise FileNotFoundError(f"--input {data_dir}: not a prepared dataset (no dataset_info.json); run `python -m "
                            "ardiff data prepare --out DIR ...` first and pass that DIR.")
  source = tfds.builder_from_directory(str(path)).as_data_source(split=split)
  out, total = [], 0
  for i in np.random.default_rng(seed).permutation(len(source)):
    value = source[int(i)][field]
    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    out.append(text)
    total += len(text.encode("utf-8"))
    if total >= max_bytes:
      break
  if not out:
    raise ValueError(f"split {split!r} of {data_dir} has no documents to train a tokenizer on.")
  return out


def train_tokenizer(texts, *, vocab_size: int, kind: str = "bpe", min_frequency: int = 2, progress: bool = False):
  """A ``tokenizers.Tokenizer`` trained on ``texts`` (an iterable of str) with :data:`SPECIALS` reserved first."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  if kind not in KINDS:
    raise ValueError(f"--kind={kind!r}: use one of {', '.join(KINDS)}.")
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  floor = len(SPECIALS) + len(alphabet) + (1 if kind == "unigram" else 0)
  if vocab_size <= floor:
    raise ValueError(f"--vocab={vocab_size} leaves no room for merges: a byte-level {kind} needs more than {floor} "
                     f"ids ({len(SPECIALS)} specials + {len(alphabet)} byte symbols); use e.g. --vocab 8192.")
  if kind == "bpe":
    tok = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                  initial_alphabet=alphabet, show_progress=progress)
  else:
    tok = Tokenizer(models.Unigram())
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=[*SPECIALS, "<unk>"], unk_token="<unk>",
                                      initial_alphabet=alphabet, show_progress=progress)
  # add_prefix_space=False: the text round-trips exactly (no space invented before the first word)
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainer=trainer)
  for i, name in enumerate(SPECIALS):
    assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))  # trainers put specials first, in order
  return tok


def run(data_dir: str, out: str, *, vocab_size: int, kind: str = "bpe", max_bytes: int = 100 << 20, seed: int = 0,
        progress: bool = True) -> dict:
  """Samples, trains, saves ``out`` and returns what the config needs (``vocab_size``, ``mask_token_id``, ...)."""
  out_path = epath.Path(out).expanduser()
  if out_path.is_dir():
    raise IsADirectoryError(f"--out {out} is a directory; give a file name such as {out.rstrip('/')}/tok.json.")
  t0 = time.perf_counter()
  texts = sample_texts(data_dir, max_bytes=max_bytes, seed=seed)
  tok = train_tokenizer(texts, vocab_size=vocab_size, kind=kind, progress=progress)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(tok.to_str())
  n = tok.get_vocab_size()
  info = {"out": str(out_path), "kind": kind, "vocab_size": n, "pad_id": 0, "bos_id": 1, "eos_id": 2,
          "mask_token_id": 3, "documents": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts),
          "seconds": round(time.perf_counter() - t0, 2)}
  print(f"Trained a byte-level {kind} tokenizer on {info['documents']:,} documents ({info['bytes']:,} bytes) in "
        f"{info['seconds']} s: {n} ids (PAD 0, BOS 1, EOS 2, [MASK] 3)" +
        (f", fewer than --vocab {vocab_size}: the sample has no more merges" if n < vocab_size else "") +
        f".\nSaved {out_path}. Train with:\n  --config.data.tokenizer=hf:{out_path} "
        f"--config.model.vocab_size={n} --config.model.mask_token_id=3")
  return info
