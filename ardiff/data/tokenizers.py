"""Tokenizers behind one small protocol: byte-level (built in), SentencePiece and Hugging Face from local files.

Spec strings understood by :func:`make_tokenizer` (the ``config.data.tokenizer`` value):

* ``"byte"`` - 256 raw UTF-8 bytes, then the specials appended in order ``bos, eos, mask``:
  BOS=256, EOS=257, MASK=258, ``vocab_size == 259``, no pad id (packing pads with 0 and marks padding
  with ``segment_ids == 0``).
* ``"byte:bos,eos,mask,pad"`` - choose which specials to append and their order (ids 256, 257, ...).
* ``"sentencepiece:/path/to/x.model"`` (alias ``"sp:"``) - a local SentencePiece model.
* ``"hf:/path/to/tokenizer.json"`` - a local Hugging Face ``tokenizers`` file.

For SentencePiece / HF models, special tokens that the model lacks (no BOS/EOS, and usually no MASK for
diffusion) are appended as *virtual* ids after the model's own vocabulary: ``vocab_size`` grows by one per
appended special, ``encode`` never produces them and ``decode`` drops them.
"""

from __future__ import annotations

import os
from typing import Iterable, Protocol, Sequence, runtime_checkable

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "HFTokenizer",
    "make_tokenizer",
    "token_byte_lengths",
]


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline and the model need from a tokenizer."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int | None
  mask_id: int | None

  def encode(self, text: str) -> list[int]:
    """Text to ids, WITHOUT BOS/EOS (the pipeline adds them per document)."""
    ...

  def decode(self, ids: Iterable[int]) -> str:
    """Ids to text; special ids are dropped."""
    ...


def _as_int_list(ids) -> list[int]:
  if hasattr(ids, "tolist"):
    ids = ids.tolist()
  return [int(i) for i in ids]


class ByteTokenizer:
  """UTF-8 bytes 0..255 plus appended special ids (default BOS=256, EOS=257, MASK=258)."""

  KNOWN_SPECIALS = ("bos", "eos", "mask", "pad")

  def __init__(self, specials: Sequence[str] = ("bos", "eos", "mask")):
    specials = tuple(s.strip().lower() for s in specials)
    unknown = [s for s in specials if s not in self.KNOWN_SPECIALS]
    if unknown or len(set(specials)) != len(specials):
      raise ValueError(f"byte tokenizer specials must be distinct names from {self.KNOWN_SPECIALS}, "
                       f"got {specials}")
    if "bos" not in specials or "eos" not in specials:
      raise ValueError(f"byte tokenizer needs at least 'bos' and 'eos' specials, got {specials}")
    ids = {name: 256 + i for i, name in enumerate(specials)}
    self.specials = specials
    self.bos_id: int = ids["bos"]
    self.eos_id: int = ids["eos"]
    self.mask_id: int | None = ids.get("mask")
    self.pad_id: int | None = ids.get("pad")
    self.vocab_size: int = 256 + len(specials)

  def encode(self, text: str | bytes) -> list[int]:
    # surrogateescape: a str from argv or os.fsdecode may carry undecodable bytes as lone surrogates; give those
    # bytes back instead of raising UnicodeEncodeError (a byte tokenizer takes any bytes).
    data = text if isinstance(text, (bytes, bytearray)) else text.encode("utf-8", "surrogateescape")
    return list(data)

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(i for i in _as_int_list(ids) if 0 <= i < 256).decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return f"ByteTokenizer(specials={self.specials}, vocab_size={self.vocab_size})"


class _VirtualSpecials:
  """Assigns ids past ``base_vocab`` to the specials a model does not have."""

  def _init_specials(self, base_vocab: int, found: dict[str, int | None], want_mask: bool, want_pad: bool):
    self.base_vocab_size = base_vocab
    next_id = base_vocab
    resolved = {}
    for name in ("bos", "eos", "mask", "pad"):
      tid = found.get(name)
      if tid is None and (name in ("bos", "eos") or (name == "mask" and want_mask)
                          or (name == "pad" and want_pad)):
        tid = next_id
        next_id += 1
      resolved[name] = tid
    self.bos_id: int = resolved["bos"]
    self.eos_id: int = resolved["eos"]
    self.mask_id: int | None = resolved["mask"]
    self.pad_id: int | None = resolved["pad"]
    self.vocab_size: int = next_id


def _check_file(path: str, kind: str, fix: str) -> str:
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{kind} tokenizer file not found: {path!r}. {fix}")
  return path


class SentencePieceTokenizer(_VirtualSpecials):
  """A local SentencePiece ``.model``; BOS/EOS/PAD from the model, MASK from a ``<mask>``/``[MASK]`` piece."""

  def __init__(self, model_path: str, *, add_mask: bool = True):
    import sentencepiece as spm  # local import: optional at module import time

    self.path = _check_file(model_path, "SentencePiece",
                            "Pass 'sentencepiece:/abs/path/to/model.model' pointing at an existing file "
                            "(train one with sentencepiece.SentencePieceTrainer.train).")
    self._sp = spm.SentencePieceProcessor(model_file=self.path)
    n = int(self._sp.get_piece_size())

    def valid(i):
      return int(i) if 0 <= int(i) < n else None

    mask = None
    for piece in ("<mask>", "[MASK]", "<MASK>"):
      pid = self._sp.piece_to_id(piece)
      if pid != self._sp.unk_id() and 0 <= pid < n and self._sp.id_to_piece(pid) == piece:
        mask = pid
        break
    self._init_specials(n, {"bos": valid(self._sp.bos_id()), "eos": valid(self._sp.eos_id()),
                            "pad": valid(self._sp.pad_id()), "mask": mask}, add_mask, False)

  def encode(self, text: str | bytes) -> list[int]:
    if isinstance(text, (bytes, bytearray)):
      text = text.decode("utf-8", errors="replace")
    return list(self._sp.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    specials = {self.bos_id, self.eos_id, self.mask_id, self.pad_id}
    return self._sp.decode([i for i in _as_int_list(ids) if 0 <= i < self.base_vocab_size and i not in specials])

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class HFTokenizer(_VirtualSpecials):
  """A local Hugging Face ``tokenizer.json`` (the ``tokenizers`` library, no ``transformers`` needed)."""

  _CANDIDATES = {
      "bos": ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>", "[CLS]"),
      "eos": ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
      # the last three: LLaDA, Fast-dLLM v2 and SDAR's [MASK] tokens (Dream's is <|mask|>)
      "mask": ("<mask>", "[MASK]", "<|mask|>", "<|mdm_mask|>", "|<MASK>|", "<|MASK|>"),
      "pad": ("<pad>", "[PAD]", "<|pad|>"),
  }

  def __init__(self, path: str, *, add_mask: bool = True):
    from tokenizers import Tokenizer as _HF  # local import

    self.path = _check_file(path, "Hugging Face",
                            "Pass 'hf:/abs/path/to/tokenizer.json' pointing at an existing file "
                            "(e.g. tokenizers.Tokenizer.save(path)).")
    self._tok = _HF.from_file(self.path)
    n = int(self._tok.get_vocab_size(with_added_tokens=True))
    found = {}
    for name, cands in self._CANDIDATES.items():
      found[name] = next((self._tok.token_to_id(c) for c in cands if self._tok.token_to_id(c) is not None), None)
    self._init_specials(n, found, add_mask, False)

  def encode(self, text: str | bytes) -> list[int]:
    if isinstance(text, (bytes, bytearray)):
      text = text.decode("utf-8", errors="replace")
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([i for i in _as_int_list(ids) if 0 <= i < self.base_vocab_size],
                            skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def token_byte_lengths(tok: Tokenizer):
  """int32 ``[vocab_size]``: the UTF-8 bytes each id stands for (specials 0), so a sequence's text length is the sum
  over its ids; None where that is not a per-id constant (SentencePiece, a Hugging Face tokenizer that is not
  byte-level). Bits per byte, comparable across tokenizers, need it: a loss per token says nothing across vocabularies.
  """
  import numpy as np
  out = np.zeros((tok.vocab_size,), np.int32)
  if isinstance(tok, ByteTokenizer):
    out[:256] = 1
    return out
  if not isinstance(tok, HFTokenizer) or type(tok._tok.decoder).__name__ != "ByteLevel":
    return None
  from tokenizers import pre_tokenizers
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())  # one character per byte (GPT-2's byte-to-unicode map)
  specials = {i for i, t in tok._tok.get_added_tokens_decoder().items() if t.special}
  for i in range(tok.base_vocab_size):
    piece = tok._tok.id_to_token(i)
    if i in specials or piece is None:
      continue
    if not set(piece) <= alphabet:  # an added non-special token spelled in plain text: no byte map to trust
      return None
    out[i] = len(piece)
  return out


def make_tokenizer(spec: "str | Tokenizer") -> Tokenizer:
  """Builds a tokenizer from a spec string (see the module docstring); a Tokenizer instance passes through."""
  if not isinstance(spec, str):
    if isinstance(spec, Tokenizer):
      return spec
    raise TypeError(f"tokenizer spec must be a string or a Tokenizer, got {type(spec).__name__}")
  kind, _, arg = spec.strip().partition(":")
  kind = kind.lower()
  if kind == "byte":
    return ByteTokenizer(arg.split(",")) if arg else ByteTokenizer()
  if kind in ("sentencepiece", "sp", "spm"):
    if not arg:
      raise ValueError("sentencepiece tokenizer needs a path: 'sentencepiece:/path/to/x.model'")
    return SentencePieceTokenizer(arg)
  if kind in ("hf", "huggingface", "tokenizers"):
    if not arg:
      raise ValueError("hf tokenizer needs a path: 'hf:/path/to/tokenizer.json'")
    return HFTokenizer(arg)
  raise ValueError(f"unknown tokenizer spec {spec!r}; use 'byte', 'byte:bos,eos,mask[,pad]', "
                   "'sentencepiece:/path/x.model' or 'hf:/path/tokenizer.json'")
