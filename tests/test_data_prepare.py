"""Bring your own data: `ardiff data prepare|tokenizer|show` on corpora the tests write (every format, gzip/zstd,
bad and empty inputs, resume after an interruption), and a prepared corpus trained through the CLI with a BPE
tokenizer the command trained."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
import zstandard

from ardiff import cli
from ardiff.data import formats, shakespeare
from ardiff.data import prepare_corpus as prep
from ardiff.data.tokenizers import HFTokenizer
from test_url_run_dirs import bucket  # noqa: F401  (fixture: gs:// URLs served from a local directory)

WORDS = ("the", "river", "ünïcode", "日本", "stone", "light", "—", "ROMEO.", "\t", "naïve", "emoji 🙂", "yonder")


def _docs(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 30)))) + f"\n{i}." for i in range(n)]


def _read(out, split):
  src = shakespeare.data_source(str(out), split)
  return [src[i]["text"].decode("utf-8") for i in range(len(src))]


def _expected(docs, frac, seed):
  held = [prep._held_out(seed, i, frac) for i in range(len(docs))]
  return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def _write_inputs(root, fmt, docs):
  """``docs`` written in ``fmt`` under ``root`` (split over files, some gzip / zstd); returns the --input pattern."""
  root.mkdir(parents=True, exist_ok=True)
  thirds = [docs[:13], docs[13:27], docs[27:]]
  if fmt == "txt":  # one document per file; file names sort in document order
    for i, d in enumerate(docs):
      data = d.encode()
      name = root / f"doc{i:03d}.txt"
      if i % 3 == 1:
        name, data = name.with_suffix(".txt.gz"), gzip.compress(data)
      elif i % 3 == 2:
        name, data = name.with_suffix(".txt.zst"), zstandard.ZstdCompressor().compress(data)
      name.write_bytes(data)
    return str(root / "doc*")
  if fmt == "jsonl":  # nested field, a gzip and a zstd shard
    for i, part in enumerate(thirds):
      data = "".join(json.dumps({"meta": {"body": d}, "id": i}) + "\n" for d in part).encode()
      data = [data, gzip.compress(data), zstandard.ZstdCompressor().compress(data)][i]
      (root / f"part{i}.jsonl{['', '.gz', '.zst'][i]}").write_bytes(data)
    return str(root / "part*")
  if fmt == "parquet":
    for i, part in enumerate(thirds):
      pq.write_table(pa.table({"meta": list(range(len(part))), "body": part}), root / f"p{i}.parquet",
                     row_group_size=5)
    return str(root / "*.parquet")
  if fmt == "hf_disk":  # the layout datasets.save_to_disk writes: Arrow stream files + state.json + dataset_info.json
    files = []
    for i, part in enumerate(thirds):
      name = f"data-{i:05d}-of-00003.arrow"
      table = pa.table({"body": part, "n": list(range(len(part)))})
      with pa.OSFile(str(root / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=4):
          w.write_batch(batch)
      files.append({"filename": name})
    (root / "state.json").write_text(json.dumps({"_data_files": files, "_split": "train"}))
    (root / "dataset_info.json").write_text(json.dumps({"features": {"body": {"dtype": "string"}}}))
    return str(root)
  if fmt == "array_record":  # raw UTF-8 records in one file, tf.train.Examples (as TFDS writes) in another
    from array_record.python import array_record_module
    for i, (part, enc) in enumerate([(docs[:20], lambda d: d.encode()),
                                     (docs[20:], lambda d: _example(d, "body"))]):
      w = array_record_module.ArrayRecordWriter(str(root / f"r{i}.array_record"), "group_size:1")
      for d in part:
        w.write(enc(d))
      w.close()
    return str(root / "*.array_record")
  raise AssertionError(fmt)


def _example(text, field):
  from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2
  f = tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=[text.encode()]))
  return tf_example_pb2.Example(features=tf_feature_pb2.Features(feature={field: f})).SerializeToString()


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_each_format_round_trips(tmp_path, fmt):
  """Every document comes back byte for byte, in input order, each split exactly the seeded hash's share."""
  docs = _docs()
  pattern = _write_inputs(tmp_path / "in", fmt, docs)
  field = "meta.body" if fmt == "jsonl" else "body"
  opts = prep.PrepareOptions(input=pattern, format=fmt, out=str(tmp_path / "out"), field=field,
                             split=("validation", 0.25), seed=3, unit_docs=7)
  summary = prep.prepare(opts, progress=False)
  train, val = _expected(docs, 0.25, 3)
  assert (_read(tmp_path / "out", "train"), _read(tmp_path / "out", "validation")) == (train, val)
  assert summary["documents"] == {"train": len(train), "validation": len(val)} and not summary["bad_records"]
  assert summary["bytes"]["train"] == sum(len(d.encode()) for d in train)
  assert summary["characters"]["validation"] == sum(len(d) for d in val)
  assert len(tfds.builder_from_directory(str(tmp_path / "out")).info.splits["train"].shard_lengths) > 1


def test_split_is_seeded_and_records_match_tfds(tmp_path):
  docs = _docs(60)
  pattern = _write_inputs(tmp_path / "in", "parquet", docs)
  a = prep.prepare(prep.PrepareOptions(pattern, "parquet", str(tmp_path / "a"), field="body", seed=1,
                                       split=("heldout", 0.3)), progress=False)
  b = prep.prepare(prep.PrepareOptions(pattern, "parquet", str(tmp_path / "b"), field="body", seed=2,
                                       split=("heldout", 0.3)), progress=False)
  assert a["documents"]["heldout"] > 0 and _read(tmp_path / "a", "heldout") != _read(tmp_path / "b", "heldout")
  for out in ("a", "b"):  # the union is the corpus whatever the seed
    assert sorted(_read(tmp_path / out, "train") + _read(tmp_path / out, "heldout")) == sorted(docs)
  features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
  assert prep.serialize("é".encode()) == features.serialize_example({"text": "é"})
  assert b["fingerprint"]["seed"] == 2
  c = prep.prepare(prep.PrepareOptions(str(tmp_path / "a"), "array_record", str(tmp_path / "c"),
                                       split=("validation", 0.0)), progress=False)  # a prepared dataset as input
  assert _read(tmp_path / "c", "train") == _read(tmp_path / "a", "heldout") + _read(tmp_path / "a", "train")  # names
  assert not c["bad_records"]


def test_bad_records_are_counted_or_strict_errors(tmp_path, capsys):
  root = tmp_path / "in"
  root.mkdir()
  lines = [b'{"text": "good one"}', b'{"text": ', b'{"other": "x"}', b'{"text": "   "}', b'{"text": 7}',
           b'{"text": "bad \xff byte"}', b"", b'{"text": "good two"}']
  (root / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  (root / "c.jsonl").write_bytes(b'{"text": "last"}\n')
  good = gzip.compress(b"".join(b'{"text": "before the damage %d"}\n' % i for i in range(3000)))
  (root / "b.jsonl.gz").write_bytes(good[:-12])  # truncated gzip: the records before the cut survive
  out = tmp_path / "out"
  s = prep.prepare(prep.PrepareOptions(str(root / "*"), "jsonl", str(out), split=("validation", 0.0)),
                   progress=False)
  assert s["bad_records"] == {"invalid_json": 1, "missing_field": 1, "empty": 1, "not_text": 1, "invalid_utf8": 1,
                              "corrupt_file": 1}
  assert s["first_bad"][0] == f"{root / 'a.jsonl'}:2: invalid_json (Expecting value)"
  train = _read(out, "train")
  assert train[:2] == ["good one", "good two"] and len(train) >= 3 + 1000 and train[-1] == "last"  # goes on after
  assert "bad records skipped: 6" in capsys.readouterr().out
  rc = cli.main(["ardiff", "data", "prepare", "--input", str(root / "a.jsonl"), "--format", "jsonl", "--out",
                 str(tmp_path / "strict"), "--strict", "--no_progress"])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith(f"error: {root / 'a.jsonl'}:2: bad record: invalid_json"), err
  assert (tmp_path / "strict" / prep.STATE_DIR).is_dir()  # it had kept a document: resumable once the file is fixed


def test_empty_and_missing_inputs_are_clear_errors(tmp_path, capsys):
  rc = cli.main(["ardiff", "data", "prepare", "--input", str(tmp_path / "nothing*.txt"), "--format", "txt",
                 "--out", str(tmp_path / "o"), "--no_progress"])
  assert rc == 2 and "matches no file" in capsys.readouterr().err
  (tmp_path / "f.txt").write_text("a line\n")
  rc = cli.main(["ardiff", "data", "prepare", "--input", str(tmp_path / "f.txt"), "--format", "txt", "--out",
                 str(tmp_path / "f.txt"), "--no_progress"])
  assert rc == 2 and "is a file; choose a directory path" in capsys.readouterr().err
  (tmp_path / "e1.txt").write_bytes(b"")
  (tmp_path / "e2.txt").write_bytes(b"  \n\n")
  with pytest.raises(ValueError, match=r"no usable document in 2 records .*empty: 2"):
    prep.prepare(prep.PrepareOptions(str(tmp_path / "e*.txt"), "txt", str(tmp_path / "o")), progress=False)
  assert not (tmp_path / "o").exists()  # a failed preparation leaves nothing that would block the corrected command
  (tmp_path / "e3.txt").write_bytes(b"a line\n")
  s = prep.prepare(prep.PrepareOptions(str(tmp_path / "e3.txt"), "txt", str(tmp_path / "o"),
                                       split=("validation", 0.0)), progress=False)
  assert s["documents"]["train"] == 1
  (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
  pq.write_table(pa.table({"body": ["ok"]}), tmp_path / "p.parquet")
  s = prep.prepare(prep.PrepareOptions(f"{tmp_path}/bad.parquet,{tmp_path}/p.parquet", "parquet", str(tmp_path / "p"),
                                       field="body", split=("validation", 0.0)), progress=False)
  assert s["bad_records"] == {"corrupt_file": 1} and s["documents"]["train"] == 1
  with pytest.raises(ValueError, match="no column 'text'"):
    prep.prepare(prep.PrepareOptions(str(tmp_path / "p.parquet"), "parquet", str(tmp_path / "q")), progress=False)
  with pytest.raises(ValueError, match="--split val-1=0.1"):
    prep.PrepareOptions("x", "txt", "o", split=("val-1", 0.1))


def test_hf_dataset_dict_reads_every_split_in_order(tmp_path):
  docs = _docs(30)
  for name, part in (("train", docs[:20]), ("test", docs[20:])):
    _write_inputs(tmp_path / "dd" / name, "hf_disk", part)
  (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
  prep.prepare(prep.PrepareOptions(str(tmp_path / "dd"), "hf_disk", str(tmp_path / "o"), field="body",
                                   split=("validation", 0.0)), progress=False)
  assert _read(tmp_path / "o", "train") == docs


def test_interrupted_prepare_resumes_to_the_same_dataset(tmp_path, monkeypatch, capsys):
  docs = _docs(50)
  pattern = _write_inputs(tmp_path / "in", "jsonl", docs)
  opts = dict(input=pattern, format="jsonl", field="meta.body", split=("validation", 0.2), unit_docs=6)
  prep.prepare(prep.PrepareOptions(out=str(tmp_path / "whole"), **opts), progress=False)
  real, seen = formats.read_records, [0]

  def dying(*args, **kwargs):  # the job is killed after 31 records
    for rec in real(*args, **kwargs):
      seen[0] += 1
      if seen[0] > 31:
        raise KeyboardInterrupt
      yield rec
  monkeypatch.setattr(formats, "read_records", dying)
  with pytest.raises(KeyboardInterrupt):
    prep.prepare(prep.PrepareOptions(out=str(tmp_path / "cut"), **opts), progress=False)
  monkeypatch.setattr(formats, "read_records", real)
  with pytest.raises(FileExistsError, match="unfinished preparation of other inputs"):
    prep.prepare(prep.PrepareOptions(out=str(tmp_path / "cut"), **{**opts, "unit_docs": 5}), progress=False)
  capsys.readouterr()
  s = prep.prepare(prep.PrepareOptions(out=str(tmp_path / "cut"), **opts), progress=False)
  assert "Resuming: 6 units (27 records)" in capsys.readouterr().out  # 13-record files end units: 6+6+1, 6+6+2
  for split in ("train", "validation"):
    assert _read(tmp_path / "cut", split) == _read(tmp_path / "whole", split)
  assert s["records"] == 50 and not (tmp_path / "cut" / prep.STATE_DIR).exists()
  assert prep.prepare(prep.PrepareOptions(out=str(tmp_path / "cut"), **opts), progress=False) == s  # done: no-op
  with pytest.raises(FileExistsError, match="--overwrite"):
    prep.prepare(prep.PrepareOptions(out=str(tmp_path / "cut"), **{**opts, "seed": 9}), progress=False)


def test_bucket_inputs_and_output(bucket, tmp_path):
  """gs:// globs in, a gs:// dataset out (built in a local staging directory, then copied into the bucket)."""
  docs = _docs(30)
  _write_inputs(bucket / "bkt" / "in", "jsonl", docs)
  s = prep.prepare(prep.PrepareOptions("gs://bkt/in/part*", "jsonl", "gs://bkt/prepared", field="meta.body",
                                       split=("validation", 0.25)), progress=False)
  names = [f"bkt/in/part{i}.jsonl{x}" for i, x in enumerate(["", ".gz", ".zst"])]
  assert [p[:5] for p in s["fingerprint"]["inputs"]] == ["gs://"] * 3  # URLs all the way (the stand-in lists
  assert [p[-len(n):] for p, n in zip(s["fingerprint"]["inputs"], names)] == names  # its root in the names)
  local = bucket / "bkt" / "prepared"  # what the bucket holds, read back through its local stand-in
  assert (_read(local, "train"), _read(local, "validation")) == _expected(docs, 0.25, 0)
  assert not prep._work_dir("gs://bkt/prepared").exists()  # the staging copy is gone


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_trained_tokenizer_reserves_specials_and_round_trips(tmp_path, kind):
  from ardiff.data import tokenizer_train
  tok = tokenizer_train.train_tokenizer(_docs(200) * 3, vocab_size=400, kind=kind)
  tok.save(str(tmp_path / "t.json"))
  hf = HFTokenizer(str(tmp_path / "t.json"))
  assert (hf.pad_id, hf.bos_id, hf.eos_id, hf.mask_id) == (0, 1, 2, 3)
  assert hf.vocab_size == tok.get_vocab_size() <= 400  # no virtual ids: every special is in the file
  for text in _docs(5, seed=9) + ["  leading spaces, \r\n CRLF and 🙂 ", "x"]:
    ids = hf.encode(text)
    assert hf.decode(ids) == text and not {0, 1, 2, 3} & set(ids)


@pytest.mark.usefixtures("fast_compiles")  # compile-dominated; what is checked is the data's way through
def test_folder_of_text_to_bpe_training_through_the_cli(tmp_path, capsys):
  """The README's three commands: prepare a folder of .txt files, train a BPE on it, show the packed rows (decoded
  back to the documents), train a few steps; a config with the byte vocabulary (configs/default_byte.py) stops at load
  with the fix."""
  docs = [f"Document {i}: " + d for i, d in enumerate(_docs(64))]  # >= 8 validation docs: one per data shard
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i, d in enumerate(docs):
    (corpus / f"{i:02d}.txt").write_text(d)
  data, tok = str(tmp_path / "data"), str(tmp_path / "tok.json")
  (corpus / ".hidden.txt").write_text("not a document")  # a directory input skips hidden files
  assert cli.main(["ardiff", "data", "prepare", "--input", str(corpus), "--format", "txt", "--out", data,
                   "--split", "validation=0.25", "--no_progress"]) == 0
  assert cli.main(["ardiff", "data", "tokenizer", "--input", data, "--vocab", "320", "--kind", "bpe", "--out", tok,
                   "--no_progress"]) == 0
  vocab = json.loads(capsys.readouterr().out.split("--config.model.vocab_size=")[1].split()[0])
  from ardiff.data import tokenizer_train
  sample = tokenizer_train.sample_texts(data, max_bytes=300, seed=1)  # the size limit: stop once it is reached
  assert sum(len(t.encode()) for t in sample[:-1]) < 300 <= sum(len(t.encode()) for t in sample) and len(sample) < 48
  assert sample == tokenizer_train.sample_texts(data, max_bytes=300, seed=1) != tokenizer_train.sample_texts(
      data, max_bytes=300, seed=2)
  flags = [f"--config.data.name={data}", f"--config.data.tokenizer=hf:{tok}", "--config.data.seq_len=32",
           "--config.objective.block_size=8", f"--config.model.vocab_size={vocab}"]
  assert cli.main(["ardiff", "data", "show", *flags, "--config.model.mask_token_id=3", "--n", "4"]) == 0
  shown = capsys.readouterr().out
  from ardiff.data import show as show_lib
  res = show_lib.show(_config(flags + ["--config.model.mask_token_id=3"]), n=4, stats_batches=1)
  hf = res["tokenizer"]
  for row in range(4):
    for seg in show_lib.describe_row(res["batch"]["tokens"][row], res["batch"]["segment_ids"][row], hf):
      assert seg["text"] in shown and any(seg["text"] in d for d in docs)
      if seg["bos"] and seg["eos"]:  # a whole document: exactly one of the originals
        assert seg["text"] in docs
  maps = [line for line in shown.splitlines() if line.startswith("  segments  ")]
  assert "packing efficiency:" in shown and len(maps) == 4 and all(m.count("|") == 3 for m in maps)  # L/B = 4
  run = str(tmp_path / "run")
  tiny = ["--config.model.num_layers=1", "--config.model.embed_dim=32", "--config.model.num_heads=2",
          "--config.model.num_kv_heads=1", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
          "--config.train.batch_size=8", "--config.train.num_steps=2", "--config.train.eval_batches=1",
          "--config.train.num_samples=0", "--config.optimizer.warmup_steps=1", f"--config.train.run_dir={run}"]
  byte_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default_byte.py")
  assert cli.main(["ardiff", "train", "--config", byte_config, *flags[:-1], *tiny, "--noprogress"]) == 2
  err = capsys.readouterr().err
  assert f"Fix: --config.model.vocab_size={vocab} --config.model.mask_token_id=3." in err and not os.path.exists(run)
  assert cli.main(["ardiff", "train", *flags, "--config.model.mask_token_id=3", *tiny, "--noprogress"]) == 0
  steps = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
  assert np.isfinite([s["loss"] for s in steps if "loss" in s]).all() and steps


def _config(flags):
  from ardiff import cli_flags
  return cli_flags.parse(["x", *flags], description="", default_config=os.path.join(cli_flags.CONFIGS_DIR,
                                                                                    "default.py"))[0]
