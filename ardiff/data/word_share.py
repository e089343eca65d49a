"""Word share: how much of a generated text is made of real words, a cheap, model-free read of sample quality.

``word_share(texts, vocabulary)`` is the share of the texts' words (maximal runs of ASCII letters, with inner
apostrophes, lowercased: ``"O'er"`` -> ``"o'er"``) that occur in ``vocabulary``. The vocabulary of the embedded
Shakespeare corpus is its TRAINING split's words (the 40 training files), so a sample only scores for words the model
could have learned. Unlike gen-PPL it needs no second model and reads directly as "are these words?"; it says nothing
about grammar or meaning (a list of real words scores 100%).
"""

from __future__ import annotations

import functools
import re
from typing import Iterable

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def words(text: str) -> list[str]:
  """Lowercased words of ``text`` (runs of ASCII letters with inner apostrophes)."""
  return [w.lower() for w in _WORD.findall(text)]


def vocabulary_of(texts: Iterable[str]) -> frozenset:
  return frozenset(w for t in texts for w in words(t))


@functools.lru_cache(maxsize=1)
def shakespeare_vocabulary() -> frozenset:
  """The words of the embedded corpus's training split (read once per process, ~1 s)."""
  from ardiff.data import shakespeare
  files = shakespeare.read_corpus_files()[:-shakespeare.NUM_VALIDATION_FILES]
  return vocabulary_of(data.decode("utf-8", errors="replace") for _, data in files)


def word_share(texts: Iterable[str], vocabulary: frozenset) -> tuple[float, int]:
  """``(share in [0, 1], number of words)`` of the words of ``texts`` found in ``vocabulary``; ``(0.0, 0)`` when
  the texts hold no words. A text ending in a letter was cut mid-word (samples have a fixed length): its last
  word is not counted."""
  ws = []
  for t in texts:
    tw = words(t)
    ws += tw[:-1] if t[-1:].isalpha() or t[-1:] == "'" else tw
  if not ws:
    return 0.0, 0
  return sum(w in vocabulary for w in ws) / len(ws), len(ws)


def sample_report(texts: Iterable[str], *, data_name: str, tokenizer: str, prompt: str) -> str | None:
  """The end-of-run line for samples of a run on the embedded Shakespeare corpus, whatever its tokenizer (the texts
  are decoded; None for other data: their training vocabulary is not at hand). ``prompt`` (the decoded prompt each
  text starts with) is not scored; ``tokenizer`` does not matter."""
  from ardiff.data import shakespeare
  if not shakespeare.is_embedded(data_name):
    return None
  gen = [t[len(prompt):] if t.startswith(prompt) else t for t in texts]
  share, n = word_share(gen, shakespeare_vocabulary())
  return f"word share: {share:.1%} of {n} sample words are in the training corpus vocabulary (goal >= 70%)"
