"""Image datasets as TFDS array_record: written offline (no TensorFlow), read by name like any prepared TFDS dataset.

Layout: ``<data_dir>/<name>/<version>/{dataset_info.json, features.json, <name>-<split>.array_record-*}``, the
layout ``tfds build`` writes, so one reader serves both:

* :func:`write` stores ``{"image": Tensor uint8 [S, S], "label": ClassLabel(10)}`` records (raw bytes: TFDS's
  ``Image`` feature needs TensorFlow to *encode* PNGs, and nothing here may need TensorFlow);
  :func:`prepare_fashion_mnist` writes Fashion-MNIST from the Debian package's sha256-checked IDX files as
  ``<data_dir>/fashion_mnist/1.0.0`` (``python -m ardiff images prepare --dataset fashion_mnist --data_dir DIR``).
* :func:`load` reads ``name`` under ``data_dir``: the newest prepared version directory through
  ``tfds.builder_from_directory`` (its own ``features.json``, so ardiff's raw tensors and the public builders' PNG
  ``Image`` features both decode, the latter with Pillow), else ``tfds.data_source(name, data_dir=...)``. Public
  datasets prepared elsewhere with ``tfds build NAME --file_format=array_record`` (``mnist``, ``cifar10``, ...)
  therefore read as they are. Colour images are turned grey (ITU-R BT.601 luma): the image models are
  single-channel.

Returns whole splits as numpy arrays, ``(uint8[n, S, S], int32[n])``, the form :mod:`ardiff.images.data` feeds to
grain (70k 28x28 images are 55 MB).
"""

from __future__ import annotations

import functools
import os

import numpy as np

VERSION = "1.0.0"
NUM_CLASSES = 10
FASHION_NAME = "fashion_mnist"
_LUMA = np.array([0.299, 0.587, 0.114])


def prepare_command(name: str, data_dir: str) -> str:
  if name == FASHION_NAME:
    return f"python -m ardiff images prepare --dataset {name} --data_dir {data_dir}"
  return f"tfds build {name} --data_dir {data_dir} --file_format=array_record (needs TensorFlow and the network)"


def _features(side: int):
  import tensorflow_datasets as tfds
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(side, side), dtype=np.uint8),
      "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)})


def write(data_dir: str, name: str, splits: dict, *, description: str = "", overwrite: bool = False) -> str:
  """Writes ``splits`` = ``{split: (uint8[n, S, S], int[n] in 0..9)}`` as ``<data_dir>/<name>/1.0.0`` (one
  array_record shard per split) and returns that directory. An existing prepared directory is an error unless
  ``overwrite``."""
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module

  out = os.path.join(os.path.expanduser(data_dir), name, VERSION)
  if os.path.exists(os.path.join(out, "dataset_info.json")) and not overwrite:
    raise FileExistsError(f"{out} already holds a prepared dataset; pass --overwrite to write it again.")
  os.makedirs(out, exist_ok=True)
  sides = {images.shape[1:] for images, _ in splits.values()}
  if len(sides) != 1 or len(next(iter(sides))) != 2 or len(set(next(iter(sides)))) != 1:
    raise ValueError(f"every split must hold square grey images [n, S, S] of one size; got shapes {sorted(sides)}.")
  features = _features(next(iter(sides))[0])
  infos = []
  for split, (images, labels) in splits.items():
    if len(images) != len(labels) or images.dtype != np.uint8:
      raise ValueError(f"split {split!r}: {len(images)} uint8 images need as many labels (got {len(labels)}, "
                       f"{images.dtype}).")
    template = tfds.core.ShardedFileTemplate(data_dir=out, dataset_name=name, split=split,
                                             filetype_suffix="array_record")
    path = template.sharded_filepath(shard_index=0, num_shards=1)
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
    num_bytes = 0
    for image, label in zip(images, labels):
      record = features.serialize_example({"image": image, "label": int(label)})
      num_bytes += len(record)
      writer.write(record)
    writer.close()
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(images)], num_bytes=num_bytes,
                                     filename_template=template))
  tfds.folder_dataset.write_metadata(data_dir=out, features=features, split_infos=infos, version=VERSION,
                                     check_data=False, description=description)
  return out


def prepare_fashion_mnist(data_dir: str, *, idx_dir: str = "", overwrite: bool = False) -> str:
  """Fashion-MNIST (60k train, 10k test, 28x28) from the Debian package's IDX files (``idx_dir``, default
  ``/usr/share/datasets/fashion-mnist``; each checked against its sha256) -> ``<data_dir>/fashion_mnist/1.0.0``."""
  from ardiff.images import data as data_lib

  splits = {split: data_lib.load_images(FASHION_NAME, split, data_dir=idx_dir, source="files")
            for split in data_lib.SPLITS}
  return write(data_dir, FASHION_NAME, splits, overwrite=overwrite,
               description="Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, MIT licence), written by `ardiff images "
                           "prepare` from the IDX files of Debian's dataset-fashion-mnist.")


def dataset_dir(name: str, data_dir: str):
  """The newest prepared version directory ``<data_dir>/<name>/<x.y.z>`` (holding dataset_info.json), or None."""
  root = os.path.join(os.path.expanduser(data_dir), name)
  if not os.path.isdir(root):
    return None
  versions = []
  for v in os.listdir(root):
    parts = v.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and os.path.exists(os.path.join(root, v,
                                                                                           "dataset_info.json")):
      versions.append((tuple(int(p) for p in parts), v))
  return os.path.join(root, max(versions)[1]) if versions else None


def data_source(name: str, split: str, data_dir: str):
  """A random-access TFDS data source of ``split`` of ``name`` (prepared under ``data_dir``; nothing downloads)."""
  import tensorflow_datasets as tfds

  path = dataset_dir(name, data_dir)
  if path is not None:
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
      raise ValueError(f"TFDS dataset {path} has no split {split!r} (it has {sorted(builder.info.splits)}).")
    return builder.as_data_source(split=split)
  try:
    return tfds.data_source(name, split=split, data_dir=os.path.expanduser(data_dir), download=False)
  except Exception as e:  # pylint: disable=broad-except  # unknown name, not prepared, not array_record
    raise FileNotFoundError(
        f"TFDS image dataset {name!r} is not prepared under image.data_dir={data_dir!r} ({e.__class__.__name__}: "
        f"{' '.join(str(e).split())[:200]}). Fix: prepare it once with `{prepare_command(name, data_dir)}`, or "
        "point image.data_dir at the directory that holds it.") from e


def _grey(images: np.ndarray) -> np.ndarray:
  """``[n, H, W]``, ``[n, H, W, 1]`` or ``[n, H, W, 3]`` -> uint8 ``[n, H, W]``."""
  if images.ndim == 3:
    return images
  if images.ndim == 4 and images.shape[-1] == 1:
    return images[..., 0]
  if images.ndim == 4 and images.shape[-1] == 3:
    return np.rint(images.astype(np.float64) @ _LUMA).clip(0, 255).astype(np.uint8)
  raise ValueError(f"images of shape {images.shape[1:]} are not grey or RGB images.")


@functools.lru_cache(maxsize=4)
def load(name: str, split: str, data_dir: str):
  """``(uint8[n, S, S], int32[n])``: all of ``split`` of the TFDS image dataset ``name`` under ``data_dir``, in
  record order. Needs an ``image`` feature of uint8 (grey or RGB, square) and a ``label`` in 0..9."""
  src = data_source(name, split, data_dir)
  records = src.__getitems__(range(len(src)))
  if not records or "image" not in records[0] or "label" not in records[0]:
    raise ValueError(f"TFDS dataset {name!r} split {split!r} has no records with 'image' and 'label' features "
                     f"(found {sorted(records[0]) if records else 'no records'}).")
  images = _grey(np.stack([np.asarray(r["image"]) for r in records]))
  labels = np.asarray([r["label"] for r in records], np.int32)
  if images.dtype != np.uint8 or images.shape[1] != images.shape[2]:
    raise ValueError(f"TFDS dataset {name!r}: images must be square uint8, got {images.dtype} {images.shape[1:]}.")
  if labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise ValueError(f"TFDS dataset {name!r}: labels must lie in 0..{NUM_CLASSES - 1} (ardiff's class-conditional "
                     f"image models have {NUM_CLASSES} classes), found {labels.min()}..{labels.max()}.")
  return images, labels
