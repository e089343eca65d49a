"""Reading raw corpora for ``ardiff data prepare``: file globs (local or ``gs://``), transparent gzip / zstd, and
one record reader per input format.

Every reader yields :class:`Record` ``(text, line, error)`` in file order: ``text`` is the document (``None`` for
a bad record), ``line`` the 1-based line (txt, jsonl) or row/record number (parquet, hf_disk, array_record) that
an error message names, ``error`` a short reason (``"invalid_utf8"``, ``"invalid_json"``, ``"missing_field"``,
``"not_text"``, ``"empty"``) or None. A file that cannot be read on (truncated gzip, not a Parquet file) ends with
one ``"corrupt_file"`` record; the records before the damage are kept.

Formats:

* ``txt``: one document per file (``unit="file"``), per blank-line-separated paragraph (``"paragraph"``) or per
  line (``"line"``).
* ``jsonl``: one JSON object per line; the document is ``obj[field]`` (dotted paths reach nested keys).
* ``parquet``: column ``field`` of each row group, streamed in batches (pyarrow).
* ``hf_disk``: a ``datasets.Dataset.save_to_disk`` directory (``state.json`` + Arrow stream files; a
  ``DatasetDict`` directory reads every split in ``dataset_dict.json`` order), read with pyarrow alone.
* ``array_record``: records that are a ``tf.train.Example`` holding ``field`` (a TFDS array_record dataset), or
  raw UTF-8 text.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
from typing import IO, Iterator

from etils import epath

__all__ = ["FORMATS", "Record", "expand_inputs", "open_bytes", "read_records", "CorruptFile"]

FORMATS = ("txt", "jsonl", "parquet", "hf_disk", "array_record")
TXT_UNITS = ("file", "paragraph", "line")
_DIR_MARKERS = {"parquet": ".parquet", "array_record": ".array_record"}  # what a directory input keeps
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclasses.dataclass(frozen=True)
class Record:
  text: str | None
  line: int
  error: str | None = None
  detail: str = ""


class CorruptFile(Exception):
  """Raised inside a reader when the file itself is damaged; turned into one ``corrupt_file`` record."""


def expand_inputs(pattern: str, fmt: str) -> list[epath.Path]:
  """The sorted files (or, for ``hf_disk``, dataset directories) that ``pattern`` names.

  ``pattern`` is one or more comma-separated globs or paths, local or URLs (``gs://bucket/dir/*.jsonl.gz``); a
  directory stands for every file below it (parquet: every ``*.parquet``, array_record: every ``*.array_record*``
  file, e.g. a prepared TFDS directory; ``hf_disk``: the directory itself). Sorted, so the order (and hence
  the prepared dataset) does not depend on the file system's listing order.
  """
  out: list[epath.Path] = []
  for part in (p.strip() for p in pattern.split(",")):
    if not part:
      continue
    matches = _glob(part)
    for m in matches:
      if fmt == "hf_disk":
        out.append(m)
      elif m.is_dir():
        marker = _DIR_MARKERS.get(fmt, "")  # a TFDS or Parquet directory also holds json metadata: skip it
        out.extend(sorted((f for f in _files_below(m) if marker in f.name), key=str))
      else:
        out.append(m)
  seen, unique = set(), []
  for p in out:
    if str(p) not in seen:
      seen.add(str(p))
      unique.append(p)
  if not unique:
    raise FileNotFoundError(f"--input {pattern!r} matches no {'directory' if fmt == 'hf_disk' else 'file'}; give "
                            "a path, a directory or a glob such as 'corpus/*.txt' or 'gs://bucket/dir/*.jsonl.gz'.")
  return unique


def _files_below(d: epath.Path) -> list[epath.Path]:
  """Every file under ``d``, hidden names skipped (iterdir recursion: epath refuses ``**`` globs on buckets)."""
  out = []
  for child in d.iterdir():
    if child.name.startswith("."):
      continue
    out.extend(_files_below(child) if child.is_dir() else [child])
  return out


def _glob(part: str) -> list[epath.Path]:
  if not any(c in part for c in "*?["):
    p = epath.Path(part).expanduser()
    return [p] if p.exists() else []
  # split at the first path component holding a wildcard: glob the rest below the fixed prefix
  pieces = part.split("/")
  first = next(i for i, s in enumerate(pieces) if any(c in s for c in "*?["))
  base = "/".join(pieces[:first]) or ("/" if part.startswith("/") else ".")
  root = epath.Path(base).expanduser()
  if not root.exists():
    return []
  return sorted(root.glob("/".join(pieces[first:])), key=str)


def open_bytes(path: epath.Path) -> IO[bytes]:
  """``path`` opened for binary reading, gzip / zstd decompressed on the fly (by magic number, not by name)."""
  raw = path.open("rb")
  head = raw.read(4)
  raw.seek(0)
  if head[:2] == _GZIP_MAGIC:
    return gzip.GzipFile(fileobj=raw, mode="rb")
  if head == _ZSTD_MAGIC:
    import zstandard  # local import: only zstd inputs need it
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
  return raw


def _decode(data: bytes, line: int) -> Record:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    return Record(None, line, "invalid_utf8", f"byte 0x{data[e.start]:02x} at offset {e.start}")
  if not text.strip():
    return Record(None, line, "empty")
  return Record(text, line)


def _lines(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
  """``(1-based line number, line without its newline)``; a decompression error becomes :class:`CorruptFile`."""
  # gzip and plain files are buffered already; zstd's stream reader has no readline of its own
  reader = f if isinstance(f, (io.BufferedIOBase, gzip.GzipFile)) else io.BufferedReader(f, 1 << 20)
  n = 0
  try:
    for n, raw in enumerate(reader, 1):
      yield n, raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw
  except (EOFError, OSError, ValueError) as e:  # truncated gzip/zstd stream, bad CRC, ...
    raise CorruptFile(f"after line {n}: {type(e).__name__}: {e}") from e


def _read_txt(path: epath.Path, unit: str) -> Iterator[Record]:
  with open_bytes(path) as f:
    if unit == "line":
      for n, raw in _lines(f):
        yield _decode(raw, n)
      return
    if unit == "file":
      try:
        data = f.read()
      except (EOFError, OSError, ValueError) as e:
        raise CorruptFile(f"{type(e).__name__}: {e}") from e
      rec = _decode(data, 1)
      if rec.error == "invalid_utf8":  # name the line of the first bad byte
        bad = int(rec.detail.rsplit(" ", 1)[1])
        rec = Record(None, data.count(b"\n", 0, bad) + 1, rec.error, rec.detail)
      yield rec
      return
    para, start = [], 1
    for n, raw in _lines(f):
      if raw.strip():
        if not para:
          start = n
        para.append(raw)
      elif para:
        yield _decode(b"\n".join(para), start)
        para = []
    if para:
      yield _decode(b"\n".join(para), start)


def _field(obj, field: str):
  for key in field.split("."):
    if not isinstance(obj, dict) or key not in obj:
      return None, False
    obj = obj[key]
  return obj, True


def _from_value(value, found: bool, line: int) -> Record:
  if not found:
    return Record(None, line, "missing_field")
  if isinstance(value, bytes):
    return _decode(value, line)
  if not isinstance(value, str):
    return Record(None, line, "not_text", f"a {type(value).__name__}")
  if not value.strip():
    return Record(None, line, "empty")
  return Record(value, line)


def _read_jsonl(path: epath.Path, field: str) -> Iterator[Record]:
  with open_bytes(path) as f:
    for n, raw in _lines(f):
      if not raw.strip():
        continue  # blank lines between objects are not records
      try:
        obj = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        yield Record(None, n, "invalid_utf8", f"byte 0x{raw[e.start]:02x} at offset {e.start}")
        continue
      except json.JSONDecodeError as e:
        yield Record(None, n, "invalid_json", e.msg)
        continue
      yield _from_value(*_field(obj, field), n)


def _column_records(batches, field: str, start: int = 0) -> Iterator[Record]:
  n = start
  for batch in batches:
    if field not in batch.schema.names:
      raise ValueError(f"no column {field!r} (columns: {batch.schema.names}); pass --field COLUMN.")
    for value in batch.column(field).to_pylist():
      n += 1
      yield _from_value(value, value is not None, n) if value is not None else Record(None, n, "missing_field")


def _read_parquet(path: epath.Path, field: str) -> Iterator[Record]:
  import pyarrow.parquet as pq
  with path.open("rb") as f:
    try:
      pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid for a file that is not Parquet
      raise CorruptFile(f"not a readable Parquet file: {e}") from e
    if field not in pf.schema_arrow.names:
      raise ValueError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}); pass --field COLUMN.")
    yield from _column_records(pf.iter_batches(batch_size=1024, columns=[field]), field)


def hf_disk_files(directory: epath.Path) -> list[epath.Path]:
  """The Arrow stream files of a ``save_to_disk`` directory, in their saved order."""
  if (directory / "dataset_dict.json").exists():
    splits = json.loads((directory / "dataset_dict.json").read_text())["splits"]
    return [f for s in splits for f in hf_disk_files(directory / s)]
  state = directory / "state.json"
  if not state.exists():
    raise FileNotFoundError(f"{directory} is not a datasets.save_to_disk directory: no state.json or "
                            "dataset_dict.json in it; pass the directory save_to_disk wrote.")
  files = json.loads(state.read_text()).get("_data_files") or []
  return [directory / f["filename"] for f in files]


def _read_hf_disk(directory: epath.Path, field: str) -> Iterator[Record]:
  import pyarrow as pa
  n = 0
  for path in hf_disk_files(directory):
    with path.open("rb") as f:
      try:
        reader = pa.ipc.open_stream(f)
      except pa.ArrowInvalid as e:
        raise CorruptFile(f"{path.name}: not an Arrow stream file: {e}") from e
      for rec in _column_records(reader, field, n):
        n = rec.line
        yield rec


def _read_array_record(path: epath.Path, field: str) -> Iterator[Record]:
  from array_record.python import array_record_module
  from tensorflow_datasets.proto import tf_example_pb2
  try:
    reader = array_record_module.ArrayRecordReader(str(path))
  except Exception as e:  # riegeli's error types are not exported
    raise CorruptFile(f"not a readable array_record file: {e}") from e
  try:
    for start in range(0, reader.num_records(), 1024):
      for i, data in enumerate(reader.read(range(start, min(start + 1024, reader.num_records()))), start + 1):
        yield _array_record_value(data, field, i, tf_example_pb2)
  finally:
    reader.close()


def _array_record_value(data: bytes, field: str, n: int, pb2) -> Record:
  try:
    example = pb2.Example.FromString(data)
    feature = example.features.feature
  except Exception:  # not a serialized Example: raw text
    return _decode(data, n)
  if field in feature and feature[field].bytes_list.value:
    return _decode(feature[field].bytes_list.value[0], n)
  if len(feature):  # an Example without the field
    return Record(None, n, "missing_field")
  return _decode(data, n)


def read_records(path: epath.Path, fmt: str, *, field: str = "text", txt_unit: str = "file") -> Iterator[Record]:
  """The records of one input (a file, or a ``save_to_disk`` directory for ``hf_disk``); see the module doc."""
  readers = {"txt": lambda: _read_txt(path, txt_unit), "jsonl": lambda: _read_jsonl(path, field),
             "parquet": lambda: _read_parquet(path, field), "hf_disk": lambda: _read_hf_disk(path, field),
             "array_record": lambda: _read_array_record(path, field)}
  last = 0
  try:
    for rec in readers[fmt]():
      last = rec.line
      yield rec
  except CorruptFile as e:
    yield Record(None, last + 1, "corrupt_file", str(e))
