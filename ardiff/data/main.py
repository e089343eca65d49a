"""``python -m ardiff data prepare|tokenizer|show``: bring your own corpus.

    python -m ardiff data prepare --input 'corpus/*.txt' --format txt --out data/corpus
    python -m ardiff data tokenizer --input data/corpus --vocab 8192 --kind bpe --out data/tok.json
    python -m ardiff data show --config.data.name=data/corpus --config.data.tokenizer=hf:data/tok.json ...
"""

from __future__ import annotations

import argparse

from ardiff.data import formats

USAGE = """usage: {prog} <prepare|tokenizer|show> [flags]    ({prog} <subcommand> --help for its flags)

  prepare    stream txt/jsonl/parquet/hf_disk/array_record inputs (globs, local or gs://, gzip/zstd) into a TFDS
             array_record dataset with train/validation splits: --config.data.name=OUT trains on it
  tokenizer  train a byte-level BPE or unigram tokenizer (PAD, BOS, EOS, [MASK] reserved) on a prepared dataset:
             --config.data.tokenizer=hf:OUT uses it
  show       print packed rows of a config decoded back to text, with segment/block boundaries, the loss mask
             and the packing efficiency"""


def _prepare(prog: str, argv) -> int:
  from ardiff.data import prepare_corpus as prepare_lib
  p = argparse.ArgumentParser(prog=prog, description=prepare_lib.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, help="files, directories or globs (comma-separated), local or gs://; "
                 ".gz and .zst inputs are decompressed transparently")
  p.add_argument("--format", required=True, choices=formats.FORMATS)
  p.add_argument("--out", required=True, help="the dataset directory to write (local or gs://)")
  p.add_argument("--field", default="text", help="jsonl key (dotted for nested) / parquet, hf_disk or array_record "
                 "column holding the text (default: text)")
  p.add_argument("--split", default="validation=0.01", help="held-out split as NAME=FRACTION of the records "
                 "(default validation=0.01)")
  p.add_argument("--seed", type=int, default=0, help="seed of the train/held-out assignment (default 0)")
  p.add_argument("--txt_unit", default="file", choices=formats.TXT_UNITS,
                 help="txt: one document per file, per blank-line paragraph or per line (default file)")
  p.add_argument("--strict", action="store_true", help="a bad record is an error naming its file and line "
                 "(default: count it, skip it, report it)")
  p.add_argument("--overwrite", action="store_true", help="replace a dataset previously prepared at --out")
  p.add_argument("--unit_docs", type=int, default=50_000, help="documents per shard (and per resume checkpoint)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  a = p.parse_args(argv)
  opts = prepare_lib.PrepareOptions(input=a.input, format=a.format, out=a.out, field=a.field,
                                    split=prepare_lib.parse_split(a.split), seed=a.seed, txt_unit=a.txt_unit,
                                    strict=a.strict, overwrite=a.overwrite, unit_docs=a.unit_docs)
  prepare_lib.prepare(opts, progress=not a.no_progress)
  return 0


def _tokenizer(prog: str, argv) -> int:
  from ardiff.data import tokenizer_train
  p = argparse.ArgumentParser(prog=prog, description=tokenizer_train.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, help="a dataset directory written by `ardiff data prepare`")
  p.add_argument("--out", required=True, help="the tokenizer.json file to write")
  p.add_argument("--vocab", type=int, default=8192, help="vocabulary size, specials included (default 8192)")
  p.add_argument("--kind", default="bpe", choices=tokenizer_train.KINDS)
  p.add_argument("--max_bytes", type=int, default=100 << 20, help="text sampled for training (default 100 MiB)")
  p.add_argument("--seed", type=int, default=0, help="seed of the document sample (default 0)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  a = p.parse_args(argv)
  tokenizer_train.run(a.input, a.out, vocab_size=a.vocab, kind=a.kind, max_bytes=a.max_bytes, seed=a.seed,
                      progress=not a.no_progress)
  return 0


def main(argv) -> int:
  prog, args = (argv[0] if argv else "ardiff data"), list(argv[1:])
  if not args or args[0] in ("-h", "--help", "help"):
    print(USAGE.format(prog=prog))
    return 0
  sub, rest = args[0], args[1:]
  if sub == "prepare":
    return _prepare(f"{prog} prepare", rest)
  if sub == "tokenizer":
    return _tokenizer(f"{prog} tokenizer", rest)
  if sub == "show":
    from ardiff.data import show
    return show.main([f"{prog} show"] + rest)
  raise ValueError(f"unknown subcommand {sub!r} of `{prog}`; use prepare, tokenizer or show.")
