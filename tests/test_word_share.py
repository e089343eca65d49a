"""The word-share metric of the end-of-run samples (ardiff/data/word_share.py)."""

from ardiff.data import word_share as ws


def test_words_and_share():
  assert ws.words("O'er the hills, ROMEO's  'twas-x9") == ["o'er", "the", "hills", "romeo's", "twas", "x"]
  vocab = ws.vocabulary_of(["the cat sat"])
  assert ws.word_share(["The cat zat."], vocab) == (2 / 3, 3)
  assert ws.word_share(["the cat sa"], vocab) == (1.0, 2)  # cut mid-word at the end: the last word is not scored
  assert ws.word_share(["", "..."], vocab) == (0.0, 0)


def test_sample_report_scores_the_generated_part_against_the_training_vocabulary():
  line = ws.sample_report(["ROMEO.\nO, she doth teach the torches to burn bright xqzv.\n"], data_name="shakespeare",
                          tokenizer="byte", prompt="ROMEO.\n")
  assert line.startswith("word share: 90.0% of 10 sample words"), line
  assert ws.sample_report(["x"], data_name="lm1b", tokenizer="byte", prompt="") is None
  # a subword tokenizer's samples are decoded text too: scored the same way
  assert ws.sample_report(["ROMEO.\nthe cat\n"], data_name="shakespeare", tokenizer="hf:tok.json",
                          prompt="ROMEO.\n").startswith("word share: 100.0% of 2 sample words")
