"""Fréchet distance: the closed form of two 1-D Gaussians, ~0 for a dataset against itself and far from 0 against
noise, in the features of ardiff's own digits classifier (whose held-out accuracy is checked too)."""

import numpy as np
import pytest

from ardiff.images import data as data_lib
from ardiff.images import fid


def test_frechet_closed_form():
  rng = np.random.default_rng(0)
  a = rng.normal(1.0, 2.0, (20000, 1))
  b = rng.normal(-0.5, 0.5, (20000, 1))
  want = (np.mean(a) - np.mean(b)) ** 2 + (np.std(a, ddof=1) - np.std(b, ddof=1)) ** 2
  assert fid.frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
  assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_self_near_zero_noise_far():
  images, labels = data_lib.load_images("digits", "train")
  test, test_labels = data_lib.load_images("digits", "test")
  unit, test_unit = data_lib.to_unit(images, "digits"), data_lib.to_unit(test, "digits")
  params = fid.train_classifier(unit, labels, steps=300, batch_size=64)
  assert fid.accuracy(params, test_unit, test_labels) > 0.85
  f_train, f_test = fid.features(params, unit), fid.features(params, test_unit)
  noise = np.random.default_rng(0).uniform(0, 1, test_unit.shape).astype(np.float32)
  f_noise = fid.features(params, noise)
  self_fd = fid.frechet_distance(f_train, f_train)
  held_out = fid.frechet_distance(f_train, f_test)  # same distribution, other images
  to_noise = fid.frechet_distance(f_train, f_noise)
  assert abs(self_fd) < 1e-6 * to_noise
  assert to_noise > 20 * held_out
