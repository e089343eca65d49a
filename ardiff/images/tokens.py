"""Discrete image tokens: grey levels as token ids, a class prefix, a raster or patch-group order.

Layout of one example of ``data.seq_len = L`` tokens for an ``S x S`` image (``n = S*S`` pixels, ``P = L - n``)::

    [class, class, ..., class (P copies) ; pixel tokens in sequence order (n)]

* pixel ids ``0..levels-1`` (:func:`quantize`: nearest level of the dataset's grey scale), class ids
  ``levels + c``, ``[MASK] = levels + 10`` (vocabulary ``levels + 11``);
* the prefix carries ``loss_mask = 0``: it is the condition, never a target and never noised. ``P = 1`` for AR and
  MDLM; for block diffusion ``P = B`` makes the prefix one whole clean block, so the pixel blocks are aligned;
* positions are ``0..L-1`` (1-D RoPE over the sequence order). This is the documented choice for the discrete
  family, which reuses the text backbone unchanged: in raster order a pixel's row and column are
  ``(i - P) // S`` and ``(i - P) % S``, so relative positions still separate rows from columns. The continuous
  ACDiT model uses true 2-D RoPE (:func:`ardiff.images.model.rope_2d`).
* ``order="patch"``: pixels of one ``p x p`` patch are consecutive (patches in raster order), so a block of
  ``B = p*p`` tokens is one patch; ``order="raster"`` with ``B = k*S`` makes a block k rows.
"""

from __future__ import annotations

import numpy as np


def quantize(images: np.ndarray, max_value: int, levels: int) -> np.ndarray:
  """int32 levels ``round(v * (levels-1) / max_value)`` (round half up, integer arithmetic). Identity for digits
  with 17 levels (max 16)."""
  v = np.asarray(images, np.int64)
  return ((2 * v * (levels - 1) + max_value) // (2 * max_value)).astype(np.int32)


def dequantize(levels_img: np.ndarray, levels: int) -> np.ndarray:
  """float32 in [0, 1]."""
  return np.asarray(levels_img, np.float32) / (levels - 1)


def pixel_order(side: int, order: str, patch_size: int) -> np.ndarray:
  """int ``[side*side]``: sequence index i holds raster pixel ``perm[i]``."""
  raster = np.arange(side * side).reshape(side, side)
  if order == "raster":
    return raster.reshape(-1)
  if order != "patch":
    raise ValueError(f"order={order!r} must be 'raster' or 'patch'.")
  g = side // patch_size
  return raster.reshape(g, patch_size, g, patch_size).transpose(0, 2, 1, 3).reshape(-1)


def encode(levels_img: np.ndarray, labels: np.ndarray, *, seq_len: int, levels: int, order: str = "raster",
           patch_size: int = 1) -> dict:
  """``levels_img int[n, S, S]``, ``labels int[n]`` -> the batch dict of ``[n, seq_len]`` int32 arrays
  (``tokens``, ``segment_ids``, ``positions``, ``loss_mask``)."""
  n, side, _ = levels_img.shape
  prefix = seq_len - side * side
  if prefix < 1:
    raise ValueError(f"seq_len={seq_len} leaves no room for the class prefix of a {side}x{side} image.")
  pixels = levels_img.reshape(n, -1)[:, pixel_order(side, order, patch_size)]
  cls = np.repeat((levels + np.asarray(labels, np.int32))[:, None], prefix, axis=1)
  tokens = np.concatenate([cls, pixels], axis=1).astype(np.int32)
  loss_mask = np.concatenate([np.zeros((n, prefix), np.int32), np.ones_like(pixels, np.int32)], axis=1)
  return {"tokens": tokens, "segment_ids": np.ones_like(tokens), "loss_mask": loss_mask,
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), tokens.shape).copy()}


def class_prefix(labels: np.ndarray, *, prefix: int, levels: int) -> np.ndarray:
  """int32 ``[n, prefix]``: the prompt the samplers continue."""
  return np.repeat((levels + np.asarray(labels, np.int32))[:, None], prefix, axis=1)


def decode(pixel_tokens: np.ndarray, *, side: int, levels: int, order: str = "raster", patch_size: int = 1):
  """``int[n, side*side]`` generated pixel tokens (sequence order) -> ``(levels int32[n, S, S], invalid)``.

  A sampler may emit a class id at a pixel (the SUBS parameterisation only removes [MASK]); such tokens are
  counted in ``invalid`` and drawn as the nearest grey level (``levels - 1``)."""
  pixel_tokens = np.asarray(pixel_tokens)
  invalid = int(np.sum(pixel_tokens >= levels))
  raster = np.empty_like(pixel_tokens)
  raster[:, pixel_order(side, order, patch_size)] = np.minimum(pixel_tokens, levels - 1)
  return raster.reshape(-1, side, side).astype(np.int32), invalid


class DiscreteTransform:
  """A picklable grain map: record ``{"image", "label"}`` -> one example (the batch dict without its batch axis)."""

  def __init__(self, *, max_value: int, seq_len: int, levels: int, order: str, patch_size: int):
    self.max_value, self.seq_len, self.levels = max_value, seq_len, levels
    self.order, self.patch_size = order, patch_size

  def __call__(self, record):
    q = quantize(record["image"][None], self.max_value, self.levels)
    ex = encode(q, np.asarray([record["label"]]), seq_len=self.seq_len, levels=self.levels, order=self.order,
                patch_size=self.patch_size)
    return {k: v[0] for k, v in ex.items()}

