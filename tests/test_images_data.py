"""Image data and discrete tokens: the vendored digits checksum, splits, determinism and checkpointable order of the
grain pipeline, token layout round trips, and the image config's checks."""

import hashlib

import numpy as np
import pytest

from ardiff import experiment
from ardiff.images import data as data_lib
from ardiff.images import tokens as tokens_lib
from configs import digits_bd


def test_digits_checksum_and_splits():
  with open(data_lib.DIGITS_FILE, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == data_lib.DIGITS_SHA256
  train, train_labels = data_lib.load_images("digits", "train")
  test, test_labels = data_lib.load_images("digits", "test")
  assert train.shape == (1500, 8, 8) and test.shape == (297, 8, 8) and train.dtype == np.uint8
  assert train.max() == 16 and train.min() == 0
  assert np.bincount(np.concatenate([train_labels, test_labels])).tolist() == [178, 182, 177, 183, 181, 182, 181,
                                                                                179, 174, 180]


def test_damaged_digits_file_is_a_clear_error(tmp_path, monkeypatch):
  bad = tmp_path / "digits.csv.gz"
  bad.write_bytes(open(data_lib.DIGITS_FILE, "rb").read()[:-1] + b"x")
  monkeypatch.setattr(data_lib, "DIGITS_FILE", str(bad))
  data_lib._digits_table.cache_clear()
  try:
    with pytest.raises(ValueError, match="sha256"):
      data_lib.load_images("digits", "train")
  finally:
    monkeypatch.undo()
    data_lib._digits_table.cache_clear()


def test_fashion_missing_names_the_package(tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    data_lib.load_images("fashion_mnist", "train", data_dir=str(tmp_path))


def test_fashion_checksum_mismatch_is_a_clear_error(tmp_path):
  import gzip
  for name in data_lib.FASHION_SHA256:
    (tmp_path / name).write_bytes(gzip.compress(b"\0" * 32))
  with pytest.raises(ValueError, match="sha256 .*Fashion-MNIST as released"):
    data_lib.load_images("fashion_mnist", "test", data_dir=str(tmp_path))


def test_pipeline_is_deterministic_and_resumes():
  images, labels = data_lib.load_images("digits", "train")
  t = tokens_lib.DiscreteTransform(max_value=16, seq_len=72, levels=17, order="raster", patch_size=1)
  make = lambda seed: iter(data_lib.make_dataset(images, labels, t, seed=seed, batch_size=16))
  a, b, c = make(0), make(0), make(1)
  first = [next(a)["tokens"] for _ in range(3)]
  assert all(np.array_equal(x, next(b)["tokens"]) for x in first)
  assert not np.array_equal(first[0], next(c)["tokens"])
  state = a.get_state()
  expected = next(a)["tokens"]
  resumed = make(0)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["tokens"], expected)


@pytest.mark.parametrize("order,patch", [("raster", 1), ("patch", 2), ("patch", 4)])
def test_token_layout_round_trip(order, patch):
  images, labels = data_lib.load_images("digits", "test")
  q = tokens_lib.quantize(images[:5], 16, 17)
  np.testing.assert_array_equal(q, images[:5])  # 17 levels on the 0..16 scale: identity
  ex = tokens_lib.encode(q, labels[:5], seq_len=64 + patch * patch, levels=17, order=order, patch_size=patch)
  prefix = patch * patch
  assert (ex["tokens"][:, :prefix] == 17 + labels[:5, None]).all() and (ex["loss_mask"][:, :prefix] == 0).all()
  assert (ex["loss_mask"][:, prefix:] == 1).all()
  back, invalid = tokens_lib.decode(ex["tokens"][:, prefix:], side=8, levels=17, order=order, patch_size=patch)
  np.testing.assert_array_equal(back, q)
  assert invalid == 0
  if order == "patch":  # a block of patch*patch tokens is one patch: pixel (r, c) of the first patch
    np.testing.assert_array_equal(ex["tokens"][:, prefix:2 * prefix].reshape(5, patch, patch), q[:, :patch, :patch])


def test_quantize_rounds_to_nearest_level():
  np.testing.assert_array_equal(tokens_lib.quantize(np.array([0, 31, 32, 127, 128, 255]), 255, 5),
                                [0, 0, 1, 2, 2, 4])


def test_image_config_checks():
  for arg in (None, "family=ar", "family=mdlm", "block_rows=2", "order=patch,block_rows=0"):
    experiment.validate(digits_bd.get_config(arg))
  c = digits_bd.get_config()
  c.data.seq_len = 64
  with pytest.raises(ValueError, match="class prefix"):
    experiment.validate(c)
  c = digits_bd.get_config()
  c.model.vocab_size = 30
  with pytest.raises(ValueError, match="model.vocab_size=28"):
    experiment.validate(c)
  c = digits_bd.get_config()
  c.image.levles = 3
  with pytest.raises(ValueError, match="did you mean 'levels'"):
    experiment.validate(c)
  c = digits_bd.get_config()
  c.image.size = 3
  with pytest.raises(ValueError, match="image.size=3"):
    experiment.validate(c)
