"""Sample quality: a Fréchet distance in the feature space of a small classifier that ardiff trains itself, and that
classifier's accuracy on class-conditional samples.

Inception features make no sense for 8x8 digits or 14x14 Fashion-MNIST, and no pretrained network can be fetched
offline, so (as is usual for these datasets) the features are the penultimate layer of a classifier trained on the
dataset's own training split: an MLP ``S*S -> 256 -> 128 (features) -> 10`` (ReLU), Adam, seeded. The distance is
FID's formula over those 128-d features:

    FD = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}),

with ``Tr (S_1 S_2)^{1/2} = sum sqrt(eig(S_1^{1/2} S_2 S_1^{1/2}))`` (a symmetric PSD matrix: exact and stable with
``eigh``, no scipy). Values are comparable only under the same classifier (dataset, size, seed, steps).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEATURES = 128


class Classifier(nn.Module):
  """``[b, S, S]`` in [0, 1] -> ``(logits [b, 10], features [b, 128])``."""

  @nn.compact
  def __call__(self, images):
    h = images.reshape(images.shape[0], -1).astype(jnp.float32) * 2.0 - 1.0
    h = nn.relu(nn.Dense(256)(h))
    feats = nn.relu(nn.Dense(FEATURES)(h))
    return nn.Dense(10)(feats), feats


@functools.partial(jax.jit, static_argnames=("tx",))
def _step(params, opt_state, images, labels, *, tx):
  import optax

  def loss(p):
    logits, _ = Classifier().apply({"params": p}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  value, grads = jax.value_and_grad(loss)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, value


def train_classifier(images: np.ndarray, labels: np.ndarray, *, steps: int = 2000, batch_size: int = 128,
                     seed: int = 0, learning_rate: float = 1e-3):
  """Params of a :class:`Classifier` trained on ``images float[n, S, S] in [0, 1]``, ``labels int[n]``."""
  import optax

  rng = np.random.default_rng(seed)
  params = Classifier().init(jax.random.key(seed), jnp.zeros((1,) + images.shape[1:]))["params"]
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)
  images, labels = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
  for _ in range(steps):
    idx = rng.integers(0, images.shape[0], batch_size)
    params, opt_state, _ = _step(params, opt_state, images[idx], labels[idx], tx=tx)
  return params


@jax.jit
def _apply(params, images):
  return Classifier().apply({"params": params}, images)


def _batched(params, images: np.ndarray, batch_size: int = 2000):
  outs = [_apply(params, jnp.asarray(images[i:i + batch_size], jnp.float32))
          for i in range(0, len(images), batch_size)]
  return np.concatenate([np.asarray(o[0]) for o in outs]), np.concatenate([np.asarray(o[1]) for o in outs])


def features(params, images: np.ndarray) -> np.ndarray:
  """float64 ``[n, 128]``."""
  return _batched(params, images)[1].astype(np.float64)


def accuracy(params, images: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(_batched(params, images)[0], axis=-1) == np.asarray(labels)))


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((m + m.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
  """FD between Gaussians fitted to the rows of ``f1 [n1, d]`` and ``f2 [n2, d]`` (each needs >= 2 rows)."""
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
    raise ValueError(f"frechet_distance needs two [n >= 2, d] feature arrays, got {f1.shape} and {f2.shape}.")
  mu1, mu2 = f1.mean(0), f2.mean(0)
  s1, s2 = np.atleast_2d(np.cov(f1, rowvar=False)), np.atleast_2d(np.cov(f2, rowvar=False))
  r = _sqrt_psd(s1)
  cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * cross)


def sample_metrics(params, samples: np.ndarray, sample_labels: np.ndarray, reference: np.ndarray) -> dict:
  """``{"fd": FD(samples, reference), "class_accuracy": classifier accuracy on the samples' conditioning labels}``."""
  return {"fd": frechet_distance(features(params, samples), features(params, reference)),
          "class_accuracy": accuracy(params, samples, sample_labels)}
