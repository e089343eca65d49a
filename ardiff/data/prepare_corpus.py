"""``ardiff data prepare``: a corpus of txt / jsonl / parquet / hf_disk / array_record inputs -> a TFDS
array_record dataset directory that ``--config.data.name=DIR`` trains on.

The output is a TFDS dataset *version* directory (``dataset_info.json``, ``features.json`` and shards
``<name>-<split>.array_record-NNNNN-of-MMMMM``) with one feature, ``text``, and two splits, ``train`` and the held
out one (``validation`` by default). It is written without TensorFlow.

* Deterministic: inputs are read in sorted order; record ``i`` of the whole input stream goes to the held-out split
  when a hash of ``(seed, i)`` falls below the fraction, so the same inputs, fraction and seed give the same
  splits, in input order, byte for byte.
* Streaming and resumable: documents are written in *units* (``unit_docs`` documents or ``unit_bytes`` bytes);
  after each unit, ``<out>/.prepare/state.json`` records where the input stream stands. Rerunning the same command
  after an interruption continues after the last finished unit (a different command is refused).
* Bad records (invalid UTF-8 or JSON, missing or non-text field, empty text, a damaged file) are counted by reason
  and the first few are named ``file:line``; ``strict=True`` makes the first one an error instead.
* ``out`` may be a URL (``gs://...``): the dataset is built in a local staging directory and copied at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import time
from typing import Any

from etils import epath

from ardiff.data import formats

__all__ = ["PrepareOptions", "prepare", "parse_split", "FEATURE"]

FEATURE = "text"
STATE_DIR = ".prepare"
SUMMARY_FILE = "prepare_summary.json"
_SHOW_BAD = 5


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """What ``ardiff data prepare`` does; see the module docstring."""

  input: str
  format: str
  out: str
  field: str = "text"
  split: tuple = ("validation", 0.01)  # (held-out split name, fraction of records)
  seed: int = 0
  txt_unit: str = "file"
  strict: bool = False
  name: str = ""  # TFDS dataset name; "" -> from the output directory's name
  unit_docs: int = 50_000
  unit_bytes: int = 128 << 20
  overwrite: bool = False

  def __post_init__(self):
    if self.format not in formats.FORMATS:
      raise ValueError(f"--format={self.format!r}: use one of {', '.join(formats.FORMATS)}.")
    if self.txt_unit not in formats.TXT_UNITS:
      raise ValueError(f"--txt_unit={self.txt_unit!r}: use one of {', '.join(formats.TXT_UNITS)}.")
    name, frac = self.split
    if not (isinstance(frac, float) and 0.0 <= frac < 1.0) or name == "train" or not name.isidentifier():
      raise ValueError(f"--split {name}={frac}: give NAME=FRACTION with a name of letters, digits and _ other than "
                       "'train' and a fraction in [0, 1), e.g. --split validation=0.01.")
    if self.unit_docs < 1 or self.unit_bytes < 1:
      raise ValueError(f"unit_docs={self.unit_docs} and unit_bytes={self.unit_bytes} must be >= 1.")


def parse_split(text: str) -> tuple:
  """``"validation=0.01"`` -> ``("validation", 0.01)``."""
  name, eq, frac = text.partition("=")
  try:
    value = float(frac)
  except ValueError:
    value = None
  if not eq or value is None or not name.strip():
    raise ValueError(f"--split {text!r}: give NAME=FRACTION, e.g. --split validation=0.01.")
  return name.strip(), value


def _dataset_name(out: str) -> str:
  base = "".join(c if c.isalnum() else "_" for c in os.path.basename(out.rstrip("/")).lower()).strip("_")
  if not base or not base[0].isalpha():
    base = "prepared_" + base
  return base


def _held_out(seed: int, index: int, frac: float) -> bool:
  """Whether record ``index`` of the input stream goes to the held-out split (a hash: no state, any order)."""
  if frac <= 0.0:
    return False
  digest = hashlib.blake2b(struct.pack("<qq", seed, index), digest_size=8).digest()
  return int.from_bytes(digest, "little") < frac * 2.0 ** 64


class _Units:
  """The unit shard files of a preparation in progress, and the state file that makes it resumable."""

  def __init__(self, work: epath.Path, splits: tuple):
    self.dir = work / STATE_DIR
    self.splits = splits
    self.writers: dict = {}

  def path(self, unit: int, split: str) -> epath.Path:
    return self.dir / f"unit-{unit:05d}.{split}.array_record"

  def open(self, unit: int):
    from array_record.python import array_record_module
    self.dir.mkdir(parents=True, exist_ok=True)
    # group_size:1 is what TFDS writes: every record is its own chunk, so random access reads one record
    self.writers = {s: array_record_module.ArrayRecordWriter(str(self.path(unit, s)), "group_size:1")
                    for s in self.splits}

  def close(self):
    for w in self.writers.values():
      w.close()
    self.writers = {}

  def read_state(self) -> dict | None:
    p = self.dir / "state.json"
    return json.loads(p.read_text()) if p.exists() else None

  def write_state(self, state: dict):
    self.dir.mkdir(parents=True, exist_ok=True)
    tmp = self.dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(self.dir / "state.json")  # atomic: a kill leaves the old or the new state, never half of one


def _fresh_state(fingerprint: dict, splits: tuple) -> dict:
  zero = {s: 0 for s in splits}
  return {"fingerprint": fingerprint, "units": [], "file_index": 0, "file_records": 0, "records": 0,
          "documents": dict(zero), "bytes": dict(zero), "characters": dict(zero), "serialized_bytes": dict(zero),
          "bad": {}, "first_bad": [], "seconds": 0.0}


def _work_dir(out: str) -> epath.Path:
  """Where the shards are built: ``out`` itself, or a local staging directory for a URL."""
  if "://" not in out:
    return epath.Path(out).expanduser()
  key = hashlib.sha1(out.encode()).hexdigest()[:16]
  return epath.Path(os.path.expanduser("~/.cache/ardiff/prepare_staging")) / key


def _check_out(out: epath.Path, work: epath.Path, fingerprint: dict, overwrite: bool) -> dict | None:
  """The finished summary when ``out`` already holds this very preparation; errors for foreign contents."""
  summary = out / SUMMARY_FILE
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"--out {out} is a file; choose a directory path (new or empty) for the dataset.")
  if (out / "dataset_info.json").exists() and not overwrite:
    if summary.exists() and json.loads(summary.read_text()).get("fingerprint") == fingerprint:
      return json.loads(summary.read_text())
    raise FileExistsError(f"{out} already holds a prepared dataset from other inputs or settings; pass --overwrite "
                          "to replace it, or choose another --out.")
  for d in {str(out): out, str(work): work}.values():
    if overwrite and d.exists() and ((d / "dataset_info.json").exists() or (d / STATE_DIR).exists()):
      d.rmtree()
    elif d.exists() and any(d.iterdir()) and not (d / STATE_DIR).exists():
      raise FileExistsError(f"--out {d} exists and is not empty (and is not a preparation of ardiff); choose a new "
                            "or empty directory.")
  return None


def prepare(opts: PrepareOptions, *, progress: bool = True) -> dict:
  """Prepares the dataset (see the module docstring); returns the summary that it also writes to
  ``<out>/prepare_summary.json``.

  Raises:
    FileNotFoundError: no input matches.  FileExistsError: ``out`` holds something else (see ``overwrite``).
    ValueError: a bad record with ``strict``; no usable document at all; a column/field that does not exist.
  """
  inputs = formats.expand_inputs(opts.input, opts.format)
  held, frac = opts.split
  splits = ("train", held)
  name = opts.name or _dataset_name(opts.out)
  fingerprint = {"inputs": [str(p) for p in inputs], "format": opts.format, "field": opts.field,
                 "txt_unit": opts.txt_unit, "split": [held, frac], "seed": opts.seed, "name": name,
                 "unit_docs": opts.unit_docs, "unit_bytes": opts.unit_bytes}
  out, work = epath.Path(opts.out).expanduser(), _work_dir(opts.out)
  done = _check_out(out, work, fingerprint, opts.overwrite)
  if done is not None:
    print(f"{out} is already prepared from these inputs; nothing to do.")
    return done
  units = _Units(work, splits)
  state = units.read_state()
  if state is not None and state["fingerprint"] != fingerprint:
    raise FileExistsError(f"{work} holds an unfinished preparation of other inputs or settings; rerun that command "
                          "to finish it, or pass --overwrite to start over.")
  resumed = state is not None
  state = state or _fresh_state(fingerprint, splits)
  if resumed:
    print(f"Resuming: {len(state['units'])} units ({state['records']:,} records) were already written.")
  created = [d for d in {str(out): out, str(work): work}.values() if not d.exists()]
  try:
    _stream(opts, inputs, units, state, frac, progress)
    return _finish(opts, out, work, units, state, name, splits)
  except ValueError:
    # The inputs are wrong before any document was kept (wrong --format or --field, nothing usable, a bad record
    # under --strict first thing): the preparation holds nothing worth resuming and would only block the corrected
    # command, so it is removed. One that kept documents stays resumable (fix the record, rerun), as do
    # interruptions (kill, Ctrl-C).
    if sum(state["documents"].values()) == 0:
      units.close()
      if units.dir.exists():
        units.dir.rmtree()
      for d in created:
        if d.exists() and not any(d.iterdir()):
          d.rmdir()
    raise


def serialize(data: bytes) -> bytes:
  """One record as TFDS writes a ``Text`` feature: a ``tf.train.Example`` with ``text`` = [data] (built from the
  protos directly, ~5x faster than ``FeaturesDict.serialize_example`` and byte-identical to it)."""
  from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2
  feature = tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=[data]))
  return tf_example_pb2.Example(features=tf_feature_pb2.Features(feature={FEATURE: feature})).SerializeToString()


def _stream(opts: PrepareOptions, inputs, units: _Units, state: dict, frac: float, show: bool) -> None:
  from tqdm import tqdm

  unit = len(state["units"])
  for split in units.splits:  # leftovers of a unit an interruption cut short
    for stale in units.dir.glob(f"unit-*.{split}.array_record") if units.dir.exists() else []:
      if int(stale.name.split(".")[0].split("-")[1]) >= unit:
        stale.unlink()
  counts = {s: [0, 0] for s in units.splits}  # this unit's documents and serialized bytes per split
  unit_text = 0
  t0, text_bytes, recs = time.perf_counter(), 0, 0
  bar = tqdm(unit=" rec", disable=not show, dynamic_ncols=True, smoothing=0.1, initial=state["records"])
  t_unit = [time.perf_counter()]  # when the open unit started (its seconds go into the state with it)

  def checkpoint(file_index, file_records):
    nonlocal unit, counts, unit_text
    units.close()
    state["units"].append({s: counts[s][0] for s in units.splits})
    for s in units.splits:
      state["serialized_bytes"][s] += counts[s][1]
    state["file_index"], state["file_records"] = file_index, file_records
    state["seconds"] += time.perf_counter() - t_unit[0]
    units.write_state(state)
    unit, counts, unit_text = unit + 1, {s: [0, 0] for s in units.splits}, 0
    t_unit[0] = time.perf_counter()

  try:
    for fi in range(state["file_index"], len(inputs)):
      path = inputs[fi]
      skip = state["file_records"] if fi == state["file_index"] else 0
      n_in_file = 0
      for rec in formats.read_records(path, opts.format, field=opts.field, txt_unit=opts.txt_unit):
        n_in_file += 1
        if n_in_file <= skip:
          continue
        index = state["records"]
        state["records"] += 1
        recs += 1
        if rec.error is not None:
          _bad(state, opts, path, rec)
        else:
          if not units.writers:
            units.open(unit)
          split = units.splits[1] if _held_out(opts.seed, index, frac) else "train"
          data = rec.text.encode("utf-8")
          blob = serialize(data)
          units.writers[split].write(blob)
          counts[split][0] += 1
          counts[split][1] += len(blob)
          state["documents"][split] += 1
          state["bytes"][split] += len(data)
          state["characters"][split] += len(rec.text)
          unit_text += len(data)
          text_bytes += len(data)
          if sum(c[0] for c in counts.values()) >= opts.unit_docs or unit_text >= opts.unit_bytes:
            checkpoint(fi, n_in_file)
        if recs % 256 == 0:
          bar.update(256)
          dt = max(time.perf_counter() - t0, 1e-9)
          bar.set_postfix_str(f"{text_bytes / dt / 1e6:.1f} MB/s, file {fi + 1}/{len(inputs)}", refresh=False)
      if units.writers or fi == len(inputs) - 1:
        checkpoint(fi + 1, 0)
    bar.update(recs % 256)
  finally:
    units.close()
    bar.close()


def _bad(state: dict, opts: PrepareOptions, path, rec: formats.Record) -> None:
  where = f"{path}:{rec.line}"
  what = rec.error + (f" ({rec.detail})" if rec.detail else "")
  if opts.strict:
    raise ValueError(f"{where}: bad record: {what}. Fix the input, or run without --strict to count and skip bad "
                     "records.")
  state["bad"][rec.error] = state["bad"].get(rec.error, 0) + 1
  if len(state["first_bad"]) < _SHOW_BAD:
    state["first_bad"].append(f"{where}: {what}")


def _finish(opts: PrepareOptions, out: epath.Path, work: epath.Path, units: _Units, state: dict, name: str,
            splits: tuple) -> dict:
  import tensorflow_datasets as tfds

  if sum(state["documents"].values()) == 0:
    bad = ", ".join(f"{k}: {v}" for k, v in state["bad"].items()) or "none"
    raise ValueError(f"no usable document in {state['records']:,} records of --input {opts.input!r} (bad records: "
                     f"{bad}; first: {state['first_bad'][:1]}). Check --format={opts.format} and --field="
                     f"{opts.field}.")
  infos = []
  for split in splits:
    shards = [(u, n[split]) for u, n in enumerate(state["units"]) if n[split]]
    for k, (u, _) in enumerate(shards):
      units.path(u, split).replace(work / f"{name}-{split}.array_record-{k:05d}-of-{len(shards):05d}")
    if shards:
      infos.append(tfds.core.SplitInfo(
          name=split, shard_lengths=[n for _, n in shards], num_bytes=state["serialized_bytes"][split],
          filename_template=tfds.core.ShardedFileTemplate(data_dir=work, dataset_name=name, split=split,
                                                          filetype_suffix="array_record")))
  features = tfds.features.FeaturesDict({FEATURE: tfds.features.Text()})
  tfds.folder_dataset.write_metadata(
      data_dir=work, features=features, split_infos=infos, version="1.0.0", check_data=False,
      description=f"Prepared by `ardiff data prepare` from {opts.input} ({opts.format}).")
  seconds = max(state["seconds"], 1e-9)
  total_bytes = sum(state["bytes"].values())
  summary = {
      "out": str(out), "documents": state["documents"], "bytes": state["bytes"], "characters": state["characters"],
      "records": state["records"], "bad_records": state["bad"], "first_bad": state["first_bad"],
      "files": len(state["fingerprint"]["inputs"]), "seconds": round(seconds, 3),
      "records_per_s": round(state["records"] / seconds, 1), "bytes_per_s": round(total_bytes / seconds, 1),
      "fingerprint": state["fingerprint"],
  }
  (work / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
  shutil.rmtree(str(units.dir), ignore_errors=True) if "://" not in str(units.dir) else units.dir.rmtree()
  if str(work) != str(out):  # URL output: copy the finished dataset from the staging directory
    out.mkdir(parents=True, exist_ok=True)
    for f in work.iterdir():
      f.copy(out / f.name, overwrite=True)
    work.rmtree()
  print(format_summary(summary, splits))
  return summary


def format_summary(s: dict, splits: tuple) -> str:
  lines = [f"Prepared {s['out']}  (--config.data.name={s['out']})"]
  for split in splits:
    lines.append(f"  {split:<11} {s['documents'][split]:>10,} documents {s['bytes'][split]:>14,} bytes "
                 f"{s['characters'][split]:>14,} characters")
  bad = sum(s["bad_records"].values())
  lines.append(f"  read {s['records']:,} records from {s['files']} inputs in {s['seconds']:.1f} s "
               f"({s['records_per_s']:,.0f} records/s, {s['bytes_per_s'] / 1e6:.1f} MB/s)")
  lines.append(f"  bad records skipped: {bad:,}" + (" (" + ", ".join(f"{k}: {v:,}" for k, v in
                                                      sorted(s["bad_records"].items())) + ")" if bad else ""))
  lines += [f"    {b}" for b in s["first_bad"]]
  for split in splits[1:]:
    if s["documents"][split] == 0:
      lines.append(f"  note: the {split!r} split is empty (too few records for the fraction): raise --split "
                   f"{split}=FRACTION, or evaluate on a slice with --config.data.eval_split='train[:1%]'.")
  return "\n".join(lines)


def read_summary(path: str) -> dict[str, Any]:
  return json.loads((epath.Path(path).expanduser() / SUMMARY_FILE).read_text())
