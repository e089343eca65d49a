"""Image datasets through TFDS array_record: a small dataset written offline in tmp reads back through the trainer's
own path (config -> batches) with its labels, shapes and a deterministic order; a public-format dataset (PNG
``Image`` features, RGB) decodes to grey; a missing dataset is an error naming the command that prepares it."""

import io
import json
import os

import numpy as np
import pytest

from ardiff import experiment
from ardiff.images import acdit_train
from ardiff.images import data as data_lib
from ardiff.images import tfds_data
from configs import fashion_acdit


def _images(n, side, seed):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, side, side), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)


@pytest.fixture(scope="module")
def small_fashion(tmp_path_factory):
  """A 28x28 'fashion_mnist' of 24 train and 12 test images, written as ardiff writes the real one."""
  root = str(tmp_path_factory.mktemp("tfds"))
  splits = {"train": _images(24, 28, 0), "test": _images(12, 28, 1)}
  path = tfds_data.write(root, "fashion_mnist", splits)
  return root, path, splits


def test_written_dataset_reads_back_exactly(small_fashion):
  root, path, splits = small_fashion
  assert path == os.path.join(root, "fashion_mnist", "1.0.0") and tfds_data.dataset_dir("fashion_mnist", root) == path
  for split, (images, labels) in splits.items():
    got, got_labels = data_lib.load_images("fashion_mnist", split, data_dir=root, source="tfds")
    assert got.dtype == np.uint8 and got_labels.dtype == np.int32
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_labels, labels)
  pooled, _ = data_lib.load_images("fashion_mnist", "test", size=14, data_dir=root, source="tfds")
  np.testing.assert_array_equal(pooled, data_lib.pool(splits["test"][0], 14))
  with pytest.raises(FileExistsError, match="--overwrite"):
    tfds_data.write(root, "fashion_mnist", splits)


def test_trainer_batches_from_tfds_are_the_files_batches(small_fashion):
  """The trainer's input (config -> acdit_train.batches) over the TFDS dataset: shapes, labels, and the same seeded
  order as the same images served from memory."""
  root, _, splits = small_fashion
  c = fashion_acdit.get_config()
  c.image.source, c.image.data_dir = "tfds", root
  exp = experiment.validate(c)
  take = lambda it: [next(it) for _ in range(4)]
  a = take(iter(acdit_train.batches(exp, "train", 8, seed=3, shuffle=True)))
  b = take(iter(acdit_train.batches(exp, "train", 8, seed=3, shuffle=True)))
  images, labels = data_lib.pool(splits["train"][0], 14), splits["train"][1]
  t = acdit_train.ContinuousTransform(dataset="fashion_mnist", patch_size=2)
  ref = take(iter(data_lib.make_dataset(images, labels, t, seed=3, batch_size=8)))
  assert a[0]["patches"].shape == (8, 49, 4) and a[0]["label"].shape == (8,)
  for x, y, r in zip(a, b, ref):
    np.testing.assert_array_equal(x["patches"], y["patches"])
    np.testing.assert_array_equal(x["patches"], r["patches"])
    np.testing.assert_array_equal(x["label"], r["label"])
  seen = np.concatenate([x["label"] for x in a[:3]])  # epoch 1 = 3 batches: a permutation of the split
  assert sorted(seen.tolist()) == sorted(labels.tolist())


def _png(image):
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def test_public_png_rgb_dataset_reads_as_grey(tmp_path):
  """The layout `tfds build cifar10 --file_format=array_record` writes (PNG Image features, RGB), built here by hand
  (encoding TFDS Image features needs TensorFlow): it decodes with Pillow and turns grey by BT.601 luma."""
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module
  from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

  out = tmp_path / "cifar10" / "3.0.2"
  out.mkdir(parents=True)
  rng = np.random.default_rng(2)
  rgb, labels = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.arange(6) % 10
  template = tfds.core.ShardedFileTemplate(data_dir=str(out), dataset_name="cifar10", split="test",
                                           filetype_suffix="array_record")
  writer = array_record_module.ArrayRecordWriter(os.fspath(template.sharded_filepath(shard_index=0, num_shards=1)),
                                                 "group_size:1")
  for image, label in zip(rgb, labels):
    feature = {"image": tf_feature_pb2.Feature(bytes_list=tf_feature_pb2.BytesList(value=[_png(image)])),
               "label": tf_feature_pb2.Feature(int64_list=tf_feature_pb2.Int64List(value=[int(label)]))}
    writer.write(tf_example_pb2.Example(features=tf_feature_pb2.Features(feature=feature)).SerializeToString())
  writer.close()
  features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(32, 32, 3)),
                                         "label": tfds.features.ClassLabel(num_classes=10)})
  info = tfds.core.SplitInfo(name="test", shard_lengths=[6], num_bytes=0, filename_template=template)
  tfds.folder_dataset.write_metadata(data_dir=str(out), features=features, split_infos=[info], version="3.0.2",
                                     check_data=False)
  assert json.loads((out / "features.json").read_text())  # the public builders' feature description
  grey, got_labels = data_lib.load_images("cifar10", "test", data_dir=str(tmp_path), source="tfds")
  luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  np.testing.assert_array_equal(grey, np.rint(luma).astype(np.uint8))
  np.testing.assert_array_equal(got_labels, labels)


def test_missing_dataset_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m ardiff images prepare --dataset fashion_mnist"):
    data_lib.load_images("fashion_mnist", "train", data_dir=str(tmp_path), source="tfds")
  with pytest.raises(FileNotFoundError, match="tfds build mnist"):
    data_lib.load_images("mnist", "train", data_dir=str(tmp_path), source="tfds")
  with pytest.raises(ValueError, match="source='tfds'"):
    data_lib.load_images("mnist", "train")
  c = fashion_acdit.get_config()
  c.image.dataset, c.image.source = "digits", "tfds"
  with pytest.raises(ValueError, match="digits is vendored"):
    experiment.validate(c)


def test_prepare_cli_refuses_to_overwrite(small_fashion, capsys):
  from ardiff import cli
  root, _, _ = small_fashion
  assert cli.main(["ardiff", "images", "prepare", "--data_dir", root]) == 2
  assert "already holds a prepared dataset; pass --overwrite" in capsys.readouterr().err
