"""Image data, offline: sklearn's digits (vendored, checksum-verified) and Fashion-MNIST (Debian's IDX files).

``load_images(cfg, split) -> (images uint8[n, H, W], labels int32[n])`` with grey values on the dataset's own scale
(digits 0..16, Fashion-MNIST 0..255), optionally mean-pooled to ``cfg.size``; :func:`to_unit` maps them to [0, 1].
:func:`make_dataset` is the grain pipeline over them: a seeded index shuffle re-drawn every epoch, a per-example
transform (tokens or patches, :mod:`ardiff.images.tokens`) and batching, with the checkpointable iterator of the
text pipeline (``it.get_state()`` / orbax ``CheckpointSave``), so runs resume bit-identically.

* ``digits``: ``ardiff/images/data/digits.csv.gz`` (UCI optdigits test set via scikit-learn 1.9.1, CC BY 4.0; see
  ``data/README.md``); rows 0..1499 are ``train``, 1500..1796 ``test``. Verified against its sha256 at every load.
* ``fashion_mnist``: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` under ``cfg.data_dir`` (default
  ``/usr/share/datasets/fashion-mnist``, Debian/Ubuntu ``apt-get install dataset-fashion-mnist``); 60k ``train``,
  10k ``test``. Each file is checked against its sha256 (Debian's package = the upstream release) and its IDX header.
* ``source="tfds"``: ``dataset`` read by name as a prepared TFDS array_record dataset under ``data_dir``
  (:mod:`ardiff.images.tfds_data`: Fashion-MNIST prepared offline by ``python -m ardiff images prepare``, or public
  ``mnist``, ``kmnist``, ``cifar10`` built with ``tfds build``).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os

import numpy as np

DIGITS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits.csv.gz")
DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
DIGITS_TRAIN = 1500  # rows [0, 1500) train, [1500, 1797) test
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_INSTALL = "sudo apt-get install -y dataset-fashion-mnist"
# sha256 of the files of Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1 (the upstream release files)
FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
DATASETS = {"digits": (8, 16), "fashion_mnist": (28, 255), "mnist": (28, 255), "kmnist": (28, 255),
            "cifar10": (32, 255)}  # native side, maximum grey value
FILE_DATASETS = ("digits", "fashion_mnist")  # source="files": vendored / Debian IDX; the others only through TFDS
SOURCES = ("files", "tfds")
TFDS_DEFAULT_DIR = "~/tensorflow_datasets"
SPLITS = ("train", "test")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@functools.lru_cache(maxsize=1)
def _digits_table() -> np.ndarray:
  with open(DIGITS_FILE, "rb") as f:
    raw = f.read()
  digest = hashlib.sha256(raw).hexdigest()
  if digest != DIGITS_SHA256:
    raise ValueError(f"{DIGITS_FILE}: sha256 {digest} != the vendored file's {DIGITS_SHA256}; the file is damaged. "
                     "Restore it from git (git checkout ardiff/images/data/digits.csv.gz) or reinstall ardiff.")
  table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.int64)
  if table.shape != (1797, 65) or table[:, :64].min() < 0 or table[:, :64].max() > 16:
    raise ValueError(f"{DIGITS_FILE}: expected 1797 rows of 64 pixels in 0..16 plus a label, got {table.shape}.")
  return table


def _read_idx(path: str, magic: int, offset: int) -> np.ndarray:
  with open(path, "rb") as f:
    packed = f.read()
  want = FASHION_SHA256.get(os.path.basename(path))
  digest = hashlib.sha256(packed).hexdigest()
  if want is not None and digest != want:
    raise ValueError(f"{path}: sha256 {digest} != {want} (Fashion-MNIST as released); the file is damaged or a "
                     f"different version. Reinstall it ({FASHION_INSTALL.replace('install', 'install --reinstall')}).")
  raw = gzip.decompress(packed)
  found = int.from_bytes(raw[:4], "big")
  if found != magic:
    raise ValueError(f"{path}: IDX magic number {found:#x} != {magic:#x}; not a Fashion-MNIST "
                     f"{'image' if magic == 2051 else 'label'} file.")
  return np.frombuffer(raw, np.uint8, offset=offset)


@functools.lru_cache(maxsize=2)
def _fashion(split: str, root: str):
  prefix = "train" if split == "train" else "t10k"
  image_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
  label_path = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
  for p in (image_path, label_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"Fashion-MNIST file {p} not found. Install the Debian package ({FASHION_INSTALL}) "
                              f"or set image.data_dir to a directory holding the four *-ubyte.gz files.")
  images = _read_idx(image_path, 2051, 16).reshape(-1, 28, 28)
  labels = _read_idx(label_path, 2049, 8).astype(np.int32)
  if len(images) != len(labels):
    raise ValueError(f"{image_path} has {len(images)} images but {label_path} {len(labels)} labels.")
  return images, labels


def pool(images: np.ndarray, size: int) -> np.ndarray:
  """Mean-pool ``[n, H, W]`` to ``[n, size, size]`` (``size`` must divide H); values stay on the same scale
  (rounded to the nearest integer)."""
  n, h, w = images.shape
  if size == h:
    return images
  if h % size or w != h:
    raise ValueError(f"image.size={size} must divide the image side {h} (square images).")
  f = h // size
  pooled = images.reshape(n, size, f, size, f).astype(np.float64).mean(axis=(2, 4))
  return np.rint(pooled).astype(images.dtype)


def tfds_dir(data_dir: str) -> str:
  return data_dir or os.environ.get("TFDS_DATA_DIR", "") or TFDS_DEFAULT_DIR


def load_images(dataset: str, split: str, *, size: int = 0, data_dir: str = "", source: str = "files"):
  """``(uint8[n, S, S], int32[n])`` of ``dataset`` ('digits' | 'fashion_mnist' | with ``source="tfds"`` also
  'mnist' | 'kmnist' | 'cifar10'), ``split`` ('train' | 'test'). ``data_dir``: the IDX directory (files) or the
  TFDS data dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  if dataset not in DATASETS:
    raise ValueError(f"image.dataset={dataset!r} must be one of {sorted(DATASETS)}.")
  if split not in SPLITS:
    raise ValueError(f"image split {split!r} must be one of {SPLITS}.")
  if source not in SOURCES:
    raise ValueError(f"image.source={source!r} must be one of {SOURCES}.")
  if source == "tfds":
    from ardiff.images import tfds_data
    images, labels = tfds_data.load(dataset, split, tfds_dir(data_dir))
    if images.shape[1] != DATASETS[dataset][0]:
      raise ValueError(f"TFDS dataset {dataset!r} under {tfds_dir(data_dir)!r} holds {images.shape[1]}x"
                       f"{images.shape[2]} images, not the {DATASETS[dataset][0]}x{DATASETS[dataset][0]} of {dataset}.")
  elif dataset not in FILE_DATASETS:
    raise ValueError(f"image.dataset={dataset!r} is read only through TFDS: set image.source='tfds' (and "
                     f"image.data_dir to its TFDS data dir).")
  elif dataset == "digits":
    table = _digits_table()
    rows = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    images = table[rows, :64].reshape(-1, 8, 8).astype(np.uint8)
    labels = table[rows, 64].astype(np.int32)
  else:
    images, labels = _fashion(split, os.path.expanduser(data_dir) if data_dir else FASHION_DIR)
  return pool(images, size or images.shape[1]), labels


def max_value(dataset: str) -> int:
  return DATASETS[dataset][1]


def to_unit(images: np.ndarray, dataset: str) -> np.ndarray:
  """float32 in [0, 1]."""
  return images.astype(np.float32) / max_value(dataset)


class ArraySource:
  """A random-access grain source over ``(images, labels)``: record i is ``{"image": [S, S] uint8, "label": int32}``."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def make_dataset(images: np.ndarray, labels: np.ndarray, transform, *, seed: int, batch_size: int,
                 shuffle: bool = True, num_epochs=None, shard_index: int = 0, shard_count: int = 1):
  """grain ``IterDataset`` of per-host batches of ``transform(record)`` (a dict of numpy arrays); ``batch_size``
  is global (``// shard_count`` rows per host). Order is a pure function of ``(seed, shard_index, shard_count)``."""
  import grain

  if batch_size % shard_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the number of hosts {shard_count}.")
  ds = grain.MapDataset.source(ArraySource(images, labels))
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  if len(ds) < batch_size // shard_count:
    raise ValueError(f"the split has {len(ds)} images per host, fewer than one batch of {batch_size // shard_count}.")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).map(transform)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=8))
  return ds.batch(batch_size // shard_count, drop_remainder=True)
