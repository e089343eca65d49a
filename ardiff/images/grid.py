"""Image grids as PNG files (matplotlib's writer, which the loss plots already use: no extra dependency)."""

from __future__ import annotations

import numpy as np


def make_grid(images: np.ndarray, *, ncol: int, scale: int = 1, border: int = 1) -> np.ndarray:
  """``float[n, H, W]`` in [0, 1] -> ``float32[rows*(H*scale+border)+border, ncol*(W*scale+border)+border]``:
  row-major tiles, each upscaled ``scale`` times (nearest), separated by ``border`` pixels of mid grey."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w = images.shape
  if ncol < 1 or scale < 1 or n < 1:
    raise ValueError(f"make_grid needs at least one image, ncol >= 1 and scale >= 1 (got n={n}, ncol={ncol}, "
                     f"scale={scale}).")
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  h, w = h * scale, w * scale
  rows = -(-n // ncol)
  grid = np.full((rows * (h + border) + border, ncol * (w + border) + border), 0.5, np.float32)
  for i, img in enumerate(images):
    r, c = divmod(i, ncol)
    y, x = border + r * (h + border), border + c * (w + border)
    grid[y:y + h, x:x + w] = img
  return grid


def write_png(path, grid: np.ndarray) -> str:
  """Writes the grey ``grid`` (values in [0, 1]) as an 8-bit PNG of exactly its shape; returns the path."""
  import io

  import matplotlib.image

  from ardiff.checkpoints.paths import as_path
  buf = io.BytesIO()
  matplotlib.image.imsave(buf, np.clip(grid, 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0, format="png")
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buf.getvalue())
  return str(path)


def grid_scale(side: int) -> int:
  """Upscale small images so a tile is at least 28 pixels wide (an 8x8 digit becomes 32x32)."""
  return max(1, -(-28 // side))
