"""grain input pipeline: TFDS source -> tokenize -> shuffle/repeat -> pack into fixed-length sequences -> batch.

Entry point::

    ds, tok = make_dataset(config.data, "train", seed=0, batch_size=64, seq_len=256, block_size=16)
    it = iter(ds)                      # grain DatasetIterator: it.get_state() / it.set_state(s),
    batch = next(it)                   # or grain.checkpoint.CheckpointSave(it) / CheckpointRestore(it) with orbax
    arrays = to_global_batch(batch, NamedSharding(mesh, P(("data", "fsdp"))))

Every element of ``ds`` is one per-host batch, a dict of numpy arrays with ``b = batch_size // shard_count``:

* ``tokens``      int32[b, L] - token ids; padding cells hold ``tokenizer.pad_id`` (0 when it has none).
* ``segment_ids`` int32[b, L] - 1, 2, 3 ... per document segment within a row, 0 = padding.
* ``positions``   int32[b, L] - 0, 1, 2 ... restarting at every segment, 0 on padding.
* ``loss_mask``   int32[b, L] - 1 on real tokens (``segment_ids != 0``), 0 on padding.

Each document becomes ``[BOS] + encode(text) + [EOS]``; a document longer than L is cut into chunks of ≤ L
tokens (BOS only on the first chunk, EOS only on the last), each chunk its own segment with positions restarting
at 0. Chunks are packed first-fit (grain ``FirstFitPackIterDataset``). Two segments never share a segment id,
and padding never carries a nonzero id.

Block-aligned mode (``block_size=B``, for block diffusion): every segment starts at a multiple of B; the gap
after a segment up to the next block boundary is padding (segment id 0). Requires ``L % B == 0``. With it, the
BD3 mask built from ``absolute_index // B`` never puts two documents in one block.

Order is a pure function of ``(seed, shard_index, shard_count)``: a global index shuffle of the source that is
re-drawn every epoch, then deterministic first-fit packing (``num_threads`` does not change the order).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import grain
import numpy as np

from ardiff.data import shakespeare
from ardiff.data.tokenizers import Tokenizer, make_tokenizer
from ardiff.sections import DataConfig  # the one data config (defaults and checks) of experiments and this pipeline

__all__ = ["DataConfig", "make_dataset", "make_source", "to_global_batch", "default_shard", "BATCH_KEYS",
           "batch_shards", "ShardedBatches", "make_sharded_batches", "ShardCountError"]

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


# Options that are arguments of make_dataset rather than experiment settings (the trainer derives them from
# train.seed, train vs eval and objective.block_size); a plain dict cfg may still carry them.
_CALL_DEFAULTS = {"seed": 0, "shuffle": True, "pack_block_size": None}


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  """Reads ``key`` from a ConfigDict / dict / DataConfig / None, with the DataConfig default."""
  if default is None:
    default = _CALL_DEFAULTS[key] if key in _CALL_DEFAULTS else getattr(DataConfig, key)
  if cfg is None:
    return default
  if isinstance(cfg, Mapping) or hasattr(cfg, "get"):   # dict, ml_collections.ConfigDict
    value = cfg.get(key, default)
  else:
    value = getattr(cfg, key, default)
  return default if value is None else value   # an explicit None means "the default"


def default_shard() -> tuple[int, int]:
  """``(jax.process_index(), jax.process_count())``."""
  import jax
  return jax.process_index(), jax.process_count()


def make_source(cfg: Any, split: str):
  """The random-access data source of ``cfg.name`` / ``split`` (see ``shakespeare.data_source``)."""
  data_dir = _cfg_get(cfg, "data_dir")  # "~/..." as configs write it; "" -> the TFDS default
  return shakespeare.data_source(_cfg_get(cfg, "name"), split, os.path.expanduser(data_dir) if data_dir else None)


class _Tokenize(grain.transforms.Map):
  """record -> {"tokens": int32[n]} = [BOS] + ids + [EOS]. Builds the tokenizer lazily (picklable)."""

  def __init__(self, tokenizer: Tokenizer | str, text_key: str):
    self._spec = tokenizer if isinstance(tokenizer, str) else None
    self._tok = None if self._spec is not None else tokenizer
    self._text_key = text_key

  def __getstate__(self):
    state = dict(self.__dict__)
    if self._spec is not None:
      state["_tok"] = None
    return state

  def map(self, record):
    if self._tok is None:
      self._tok = make_tokenizer(self._spec)
    tok = self._tok
    try:
      value = record[self._text_key]
    except (KeyError, TypeError, IndexError) as e:
      keys = list(record.keys()) if hasattr(record, "keys") else type(record).__name__
      raise KeyError(f"text_key {self._text_key!r} not in the dataset's records (features: {keys}); "
                     "set config.data.text_key") from e
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
      ids = value.reshape(-1).astype(np.int32)
    else:
      if isinstance(value, np.ndarray):  # 0-d object/bytes array (tfds mock data)
        value = value.item()
      if isinstance(value, (bytes, bytearray)) and not hasattr(tok, "specials"):
        value = value.decode("utf-8", errors="replace")
      ids = np.asarray(tok.encode(value), dtype=np.int32)
    out = np.empty(ids.shape[0] + 2, np.int32)
    out[0], out[1:-1], out[-1] = tok.bos_id, ids, tok.eos_id
    return {"tokens": out}


class _Chunk(grain.experimental.FlatMapTransform):
  """Cuts a tokenized document into pieces of ≤ max_len tokens (each becomes its own segment)."""

  def __init__(self, max_len: int):
    self.max_len = max_len
    self.max_fan_out = 1 << 30   # not used by FlatMapIterDataset; documents may be arbitrarily long

  def flat_map(self, element):
    t = element["tokens"]
    if t.shape[0] <= self.max_len:
      return [element]
    return [{"tokens": t[i:i + self.max_len]} for i in range(0, t.shape[0], self.max_len)]


class _ToModelBatch(grain.transforms.Map):
  """Packed row (grain naming) -> the model's keys, int32."""

  def map(self, row):
    seg = np.asarray(row["tokens_segment_ids"], np.int32)
    return {
        "tokens": np.asarray(row["tokens"], np.int32),
        "segment_ids": seg,
        "positions": np.asarray(row["tokens_positions"], np.int32),
        "loss_mask": (seg != 0).astype(np.int32),
    }


def make_dataset(cfg: Any = None, split: str = "train", *, seed: int | None = None, batch_size: int,
                 seq_len: int | None = None, block_size: int | None = None, num_epochs: int | None = None,
                 shuffle: bool | None = None, shard_index: int | None = None, shard_count: int | None = None,
                 tokenizer: Tokenizer | str | None = None, source: Any = None,
                 drop_remainder: bool = True) -> tuple[grain.IterDataset, Tokenizer]:
  """Builds the packed, batched grain pipeline for one host. Returns ``(dataset, tokenizer)``.

  Args:
    cfg: ``config.data`` (ConfigDict / dict / DataConfig / None for the defaults); keys in ``DataConfig`` (a plain
      dict may also give ``seed``, ``shuffle`` and ``pack_block_size``, the defaults of the arguments below).
    split: TFDS split, slicing allowed (``"train"``, ``"validation"``, ``"train[:10%]"``).
    seed: shuffle/packing seed (default ``cfg["seed"]``, else 0). Same seed -> same batches.
    batch_size: GLOBAL batch size; each host yields ``batch_size // shard_count`` rows (must divide).
    seq_len: L (default ``cfg.seq_len``).
    block_size: B for block-aligned packing (default ``cfg["pack_block_size"]``; 0/None -> plain packing).
    num_epochs: None = repeat forever (training); 1 = one pass (evaluation).
    shuffle: default ``cfg["shuffle"]``, else True; pass False for evaluation.
    shard_index, shard_count: this host's slice of the source records (default ``jax.process_index()`` /
      ``jax.process_count()``); hosts read disjoint records that together cover the split.
    tokenizer: a Tokenizer or spec overriding ``cfg.tokenizer``.
    source: a ready random-access source (len + getitem) overriding ``cfg.name``/``data_dir``.
    drop_remainder: drop a final partial batch (only matters with ``num_epochs``).

  Raises:
    ValueError: bad sizes (batch not divisible by hosts, L not a multiple of B, ...).
    FileNotFoundError: dataset not prepared at data_dir, or tokenizer file missing (message names path and fix).
  """
  seed = int(_cfg_get(cfg, "seed") if seed is None else seed)
  seq_len = int(_cfg_get(cfg, "seq_len") if seq_len is None else seq_len)
  if block_size is None:
    block_size = _cfg_get(cfg, "pack_block_size")
  block_size = int(block_size or 0)
  shuffle = bool(_cfg_get(cfg, "shuffle") if shuffle is None else shuffle)
  num_threads = int(_cfg_get(cfg, "num_threads"))
  prefetch = int(_cfg_get(cfg, "prefetch"))
  text_key = _cfg_get(cfg, "text_key")
  shuffle_buffer = _cfg_get(cfg, "shuffle_buffer")

  if shard_index is None or shard_count is None:
    d_index, d_count = default_shard()
    shard_index = d_index if shard_index is None else shard_index
    shard_count = d_count if shard_count is None else shard_count
  if not (isinstance(shard_count, int) and shard_count >= 1 and 0 <= shard_index < shard_count):
    raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
                     f"shard_count={shard_count}")
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if batch_size % shard_count:
    raise ValueError(f"global batch_size={batch_size} is not divisible by the number of hosts "
                     f"(shard_count={shard_count}); each host needs batch_size // shard_count rows")
  local_batch = batch_size // shard_count
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2 (BOS + one token), got {seq_len}")
  if block_size < 0 or (block_size and seq_len % block_size):
    raise ValueError(f"block-aligned packing needs seq_len % pack_block_size == 0, got seq_len={seq_len}, "
                     f"pack_block_size={block_size}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")

  tok_spec = tokenizer if tokenizer is not None else _cfg_get(cfg, "tokenizer")
  tok = make_tokenizer(tok_spec)   # fails early on a missing file
  if source is None:
    source = make_source(cfg, split)
  n = len(source)
  if n < shard_count:
    raise ValueError(f"split {split!r} has {n} records, fewer than shard_count={shard_count} hosts")

  ds = grain.MapDataset.source(source)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map(_Tokenize(tok_spec if isinstance(tok_spec, str) else tok, text_key))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  ds = grain.experimental.FlatMapIterDataset(ds, _Chunk(seq_len))
  pad_value = tok.pad_id if tok.pad_id is not None else 0
  bins = _cfg_get(cfg, "pack_bins") or max(local_batch, 8)
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"tokens": seq_len}, num_packing_bins=int(bins), seed=seed, shuffle_bins=shuffle,
      pack_alignment_struct={"tokens": block_size} if block_size else None,
      padding_struct={"tokens": pad_value})
  ds = ds.map(_ToModelBatch())
  if shuffle_buffer:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=int(shuffle_buffer), seed=seed + 1)
  ds = ds.batch(local_batch, drop_remainder=drop_remainder)
  return ds, tok


def to_global_batch(batch: Mapping[str, np.ndarray], sharding) -> dict:
  """Per-host numpy batch -> global ``jax.Array``s via ``jax.make_array_from_process_local_data``.

  ``sharding`` is one ``jax.sharding.Sharding`` for every key (e.g. ``NamedSharding(mesh, P(("data",
  "fsdp")))``) or a dict of them. The global batch is ``local rows * process_count`` and must divide evenly
  over the devices the batch axis is sharded on.
  """
  import jax

  out = {}
  for k, v in batch.items():
    s = sharding[k] if isinstance(sharding, Mapping) else sharding
    v = np.asarray(v)
    global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
    try:
      s.shard_shape(global_shape)
    except ValueError as e:
      raise ValueError(f"batch[{k!r}] with global shape {global_shape} cannot be sharded by {s}: the global "
                       "batch size must be divisible by the number of devices on the batch axes") from e
    out[k] = jax.make_array_from_process_local_data(s, v, global_shape)
  return out


# ---------------------------------------------------------------------------------------------- multi-process
# The global batch of a run is the concatenation of S *data shards*, S = the number of distinct row blocks of the
# batch sharding (mesh.data * mesh.fsdp). Shard s reads records s, s+S, s+2S, ... of the split, shuffles and packs
# them on its own and yields batch_size // S rows: the rows device block s holds. A process reads only the shards
# its devices hold, so processes read disjoint records, and the global batch (rows and order) depends on S alone --
# 2 processes x 2 devices and 1 process x 4 devices with the same mesh see the same batches. Iterator states are
# kept per shard, so a checkpoint restores under any process count with the same S.


class ShardCountError(ValueError):
  """A checkpointed data iterator was written for another number of data shards (mesh.data * mesh.fsdp)."""


def batch_shards(sharding, batch_size: int) -> tuple[int, list[int]]:
  """``(S, [shard indices this process holds, in row order])`` for a batch of ``batch_size`` rows placed with
  ``sharding`` (a Sharding of the batch's leading dim). Raises ValueError when S does not divide the batch."""
  import jax
  blocks = sorted({(sl[0].start or 0) for sl in sharding.devices_indices_map((batch_size,)).values()})
  num = len(blocks)
  if batch_size % num:
    raise ValueError(f"train/eval batch_size={batch_size} is not divisible by the {num} data shards "
                     "(mesh.data * mesh.fsdp); pick a batch size that is a multiple of it")
  mine = sorted({(sl[0].start or 0) for d, sl in sharding.devices_indices_map((batch_size,)).items()
                 if d.process_index == jax.process_index()})
  size = batch_size // num
  return num, [start // size for start in mine]


class ShardedBatches:
  """This process's rows of every global batch: one grain iterator per local data shard, concatenated row-wise.

  ``next()`` gives the per-process batch (dict of numpy arrays ``[local_rows, L]``) that
  :func:`to_global_batch` turns into global arrays. ``get_state()`` is ``{"num_shards": S, "shards": {"s":
  json state}}`` for the local shards; ``set_state`` takes such a dict holding (at least) the local shards.
  Stops when any local shard is exhausted (evaluation: see ``ardiff.distributed.any_process``).
  """

  def __init__(self, datasets: dict[int, Any], num_shards: int):
    self.num_shards = num_shards
    self._datasets = datasets
    self._iters = {s: iter(ds) for s, ds in datasets.items()}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    parts = [next(it) for _, it in sorted(self._iters.items())]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    import json
    return {"num_shards": self.num_shards,
            "shards": {str(s): json.dumps(it.get_state(), sort_keys=True) for s, it in self._iters.items()}}

  def set_state(self, state: dict) -> None:
    import json
    saved = int(state.get("num_shards", -1))
    if saved != self.num_shards:
      raise ShardCountError(
          f"the checkpoint's data iterator has {saved} data shards but this run has {self.num_shards} "
          "(mesh.data * mesh.fsdp): restoring it would replay or skip data. Resume with the mesh it was trained "
          f"on (data * fsdp = {saved}, any number of processes), or start a new run_dir with "
          "train.init_from=<this run> to keep the parameters and restart the data.")
    missing = [s for s in self._iters if str(s) not in state["shards"]]
    if missing:
      raise ShardCountError(f"the checkpoint's data iterator lacks shards {missing}")
    for s, it in self._iters.items():
      it.set_state(json.loads(state["shards"][str(s)]))


def make_sharded_batches(cfg: Any, split: str, *, sharding, batch_size: int, seed: int, seq_len: int,
                         block_size: int = 0, num_epochs: int | None = None, shuffle: bool = True,
                         tokenizer: Tokenizer | str | None = None) -> tuple[ShardedBatches, Tokenizer]:
  """This process's :class:`ShardedBatches` of the GLOBAL ``batch_size`` placed with ``sharding``; arguments as
  :func:`make_dataset`. Returns ``(iterator, tokenizer)``."""
  num, mine = batch_shards(sharding, batch_size)
  source = make_source(cfg, split)
  tok = make_tokenizer(tokenizer if tokenizer is not None else _cfg_get(cfg, "tokenizer"))
  datasets = {}
  for s in mine:
    datasets[s], _ = make_dataset(cfg, split, seed=seed, batch_size=batch_size, seq_len=seq_len,
                                  block_size=block_size, num_epochs=num_epochs, shuffle=shuffle, shard_index=s,
                                  shard_count=num, tokenizer=tokenizer if tokenizer is not None else tok,
                                  source=source)
  return ShardedBatches(datasets, num), tok
