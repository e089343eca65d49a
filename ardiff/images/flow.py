"""ACDiT objective and sampler: rectified flow inside blocks, blockwise autoregression across blocks.

Objective (rectified flow, velocity prediction; the choice the issue asks to state): with clean patches ``x``
(pixels scaled to [-1, 1]), noise ``eps ~ N(0, I)`` and one time ``t ~ U[0, 1]`` per block (``t = 1`` clean),

    x_t = t * x + (1 - t) * eps,        target velocity  v = x - eps,        loss = mean |v_theta(x_t, t) - v|^2

where ``v_theta`` of block b sees ``x_t`` of its own block and the *clean* blocks < b. All blocks train in one
forward over ``[x_t (0..n-1) ; x (n..2n-1)]`` with ``masks.BD3(n, B)`` (ACDiT's SCAM with its two halves swapped:
``tests/test_images_acdit.py`` checks the two predicates agree under that swap); the clean half carries ``t = 1``.
``B = n`` is a plain DiT (one bidirectional stream, no clean copy). Labels are replaced by the null class with
probability ``label_dropout`` (classifier-free guidance).

Sampler: block by block, ``steps`` Euler steps ``x += v * dt`` from ``t = 0`` (noise) to 1 against an exact K/V
cache of the clean blocks; with ``kv_write="fused"`` (ACDiT's lazy write) the first step of block b also runs the
clean block b-1 (``t = 1``) in front of it, which writes its K/V; ``"separate"`` spends one extra forward per
block. Guidance: ``v = v_null + w (v_cond - v_null)``, both halves in one batched forward (``w = 1``: the plain
conditional model, and then no null half is run).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ardiff import masks as masks_lib
from ardiff.images.model import ACDiT, grid_positions
from ardiff.model import KVCache
from ardiff.sections import IMAGE_CLASSES

NULL_CLASS = IMAGE_CLASSES
KV_WRITES = ("fused", "separate")


def patchify(images: jax.Array, p: int) -> jax.Array:
  """``[b, S, S]`` in [0, 1] -> ``float32[b, (S/p)^2, p*p]`` in [-1, 1], patches in raster order."""
  b, s, _ = images.shape
  g = s // p
  x = jnp.asarray(images, jnp.float32).reshape(b, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(b, g * g, p * p)
  return 2.0 * x - 1.0


def unpatchify(patches: jax.Array, p: int) -> jax.Array:
  """Inverse of :func:`patchify`, clipped to [0, 1]."""
  b, n, _ = patches.shape
  g = int(round(n ** 0.5))
  x = jnp.asarray(patches).reshape(b, g, g, p, p).transpose(0, 1, 3, 2, 4).reshape(b, g * p, g * p)
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def noisy_inputs(x, eps, t_blocks, block_size: int):
  """``(x_t, t per token [b, n], target velocity)`` for block times ``t_blocks [b, n / B]``."""
  t = jnp.repeat(t_blocks, block_size, axis=1)
  return t[..., None] * x + (1.0 - t[..., None]) * eps, t, x - eps


def train_velocity(params, model: ACDiT, x_t, t, x, labels, *, block_size: int, force_two_stream: bool = False):
  """``[b, n, patch_dim]``: each block's velocity given its noisy self and the clean blocks before it."""
  b, n, _ = x.shape
  rows, cols = grid_positions(n, b)
  if block_size == n and not force_two_stream:  # whole image = one block: a plain DiT, nothing clean to see
    return model.apply({"params": params}, x_t, t, labels, rows=rows, cols=cols, mask=masks_lib.Full()).velocity
  cat = lambda a, c: jnp.concatenate([a, c], axis=1)
  out = model.apply({"params": params}, cat(x_t, x), cat(t, jnp.ones_like(t)), labels, rows=cat(rows, rows),
                    cols=cat(cols, cols), mask=masks_lib.BD3(n, block_size))
  return out.velocity[:, :n]


class Noise(NamedTuple):
  eps: jax.Array  # [b, n, patch_dim]
  t_blocks: jax.Array  # [b, n / B]
  drop: jax.Array  # bool [b]: label replaced by the null class


def sample_noise(rng, shape, block_size: int, label_dropout: float) -> Noise:
  b, n, _ = shape
  r_e, r_t, r_y = jax.random.split(rng, 3)
  return Noise(jax.random.normal(r_e, shape, jnp.float32), jax.random.uniform(r_t, (b, n // block_size)),
               jax.random.uniform(r_y, (b,)) < label_dropout)


def flow_loss_with_noise(params, batch, noise: Noise, *, model: ACDiT, block_size: int, force_two_stream=False):
  x, labels = batch["patches"], batch["label"]
  x_t, t, target = noisy_inputs(x, noise.eps, noise.t_blocks, block_size)
  labels = jnp.where(noise.drop, NULL_CLASS, labels)
  v = train_velocity(params, model, x_t, t, x, labels, block_size=block_size, force_two_stream=force_two_stream)
  return jnp.mean(jnp.square(v - target))


def flow_loss(params, batch, rng, *, model: ACDiT, block_size: int, label_dropout: float):
  """``(loss, metrics)``; ``batch``: ``patches float32[b, n, patch_dim]``, ``label int32[b]``."""
  noise = sample_noise(rng, batch["patches"].shape, block_size, label_dropout)
  loss = flow_loss_with_noise(params, batch, noise, model=model, block_size=block_size)
  return loss, {"loss": loss}


# ------------------------------------------------------------------------------------------------------ sampler
@functools.partial(jax.jit, static_argnames=("model", "block_size"))
def _cached_velocity(params, cache, x, t, labels, rows, cols, *, model: ACDiT, block_size: int):
  out = model.apply({"params": params}, x, t, labels, rows=rows, cols=cols, mask=masks_lib.BlockCausal(block_size),
                    cache=cache)
  return out.velocity, out.cache


def sample(params, model: ACDiT, labels, *, rng, num_patches: int, block_size: int, steps: int,
           cfg_scale: float = 1.0, kv_write: str = "fused", return_blocks: bool = False):
  """Patches ``float32[b, num_patches, patch_dim]`` for class ``labels [b]``; deterministic under ``rng``.

  With ``return_blocks`` also a list, per block, of the velocities of every Euler step (``[steps]`` arrays of
  ``[b, B, patch_dim]``, guided), for the cached-vs-uncached test."""
  if kv_write not in KV_WRITES:
    raise ValueError(f"kv_write={kv_write!r} must be one of {KV_WRITES}.")
  if num_patches % block_size:
    raise ValueError(f"block_size={block_size} must divide the {num_patches} patches.")
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1.")
  labels = jnp.asarray(labels, jnp.int32)
  b, B, nb = labels.shape[0], block_size, num_patches // block_size
  guided = cfg_scale != 1.0
  y = jnp.concatenate([labels, jnp.full_like(labels, NULL_CLASS)]) if guided else labels
  rows_all, cols_all = grid_positions(num_patches, y.shape[0])
  cache = KVCache.init(model.config, y.shape[0], num_patches, jnp.float32)
  call = functools.partial(_cached_velocity, params, model=model, block_size=B)
  dup = (lambda a: jnp.concatenate([a, a])) if guided else (lambda a: a)
  blocks, velocities, prev = [], [], None
  for blk in range(nb):
    sl = slice(blk * B, (blk + 1) * B)
    x = jax.random.normal(jax.random.fold_in(rng, blk), (b, B, model.patch_dim), jnp.float32)
    per_step = []
    for s in range(steps):
      t = jnp.full((y.shape[0], B), s / steps, jnp.float32)
      if s == 0 and prev is not None and kv_write == "fused":  # lazy write: [clean b-1 ; noisy b]
        psl = slice((blk - 1) * B, blk * B)
        v, cache = call(cache, jnp.concatenate([dup(prev), dup(x)], 1), jnp.concatenate([jnp.ones_like(t), t], 1),
                        y, rows_all[:, psl.start:sl.stop], cols_all[:, psl.start:sl.stop])
        v = v[:, B:]
        cache = cache.advance(B)
      else:
        v, cache = call(cache, dup(x), t, y, rows_all[:, sl], cols_all[:, sl])
      if guided:
        v = v[b:] + cfg_scale * (v[:b] - v[b:])
      per_step.append(v)
      x = x + v / steps
    if kv_write == "separate" and blk + 1 < nb:  # one more forward of the clean block writes its K/V
      _, cache = call(cache, dup(x), jnp.ones((y.shape[0], B), jnp.float32), y, rows_all[:, sl], cols_all[:, sl])
      cache = cache.advance(B)
    prev = x
    blocks.append(x)
    velocities.append(per_step)
  out = jnp.concatenate(blocks, axis=1)
  return (out, velocities) if return_blocks else out


def sample_images(params, model: ACDiT, labels, *, rng, image, block_size: int, steps=None, cfg_scale=None,
                  kv_write: str = "fused") -> np.ndarray:
  """``float32[b, S, S]`` in [0, 1] for an :class:`ardiff.sections.ImageConfig` ``image``."""
  patches = sample(params, model, labels, rng=rng, num_patches=image.num_tokens, block_size=block_size,
                   steps=steps or image.denoise_steps, cfg_scale=image.cfg_scale if cfg_scale is None else cfg_scale,
                   kv_write=kv_write)
  return np.asarray(unpatchify(patches, image.patch_size))
