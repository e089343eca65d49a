"""TPU tile sizes of the block-sparse attention kernels, chosen per TPU generation, head dim and sequence lengths
from per-tile costs measured by the TPU compiler.

``benchmarks/tpu_kernel_cost.py`` compiles the kernels (forward and the dK/dV pass that also computes dQ) for a
TPU generation on a CPU host (libtpu AOT) and counts the scheduled VLIW bundles (~ issue cycles) of each kernel's
grid loop: the compute body of an unmasked (FULL) and of a partially masked (PARTIAL) tile, the bundles run once
per output row (accumulator init, finalize) and the per-grid-step overhead (index maps, DMA issue and wait).
:data:`MEASURED` holds those four figures per pass for square tiles of 128, 256, 512 and 1024, keyed by generation
and head dim (BD3 mask, block 16, T = 4096, 8 heads, bf16, ``--masks bd3_16 --seq 4096 --tiles 128,256,512,1024
--head-dim 64,128``). The bodies do not depend on the mask or the length (partial tiles read a deduplicated int8
table whatever the mask); only how many tiles of each kind a call visits does, and that comes from the mask's own
block classes. So :func:`tpu_tiles` ranks the candidate tiles of a call by

  ``q_tiles * fwd_width * step + q_tiles * row + UNMASKED * full + MASKED * partial`` (forward)
  + the same over the transposed lists (dK/dV + dQ),

per (batch row, head), exactly the estimate the benchmark prints, for the call's own mask and lengths, and takes
the cheapest. Padding is visited and masked like any partial tile, so a tile that does not divide the length pays
for it. A length shorter than a candidate tile makes that tile one tile of the length (rounded up to 8), its
bodies scaled by the area.

The generation comes from the devices being compiled for (:func:`detect_generation`). When it is not known (the
Pallas interpreter on a CPU host, an unlisted device kind, or a head dim above the measured ones) the choice is
:func:`tpu_default_block`, a length-only rule over tiles up to 512, which compile on every generation within the
default scoped VMEM at head dims up to 256. A head dim between measured ones uses the next larger measured one
(its costs are an upper bound).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ardiff import masks as masks_lib

GENERATIONS = ("v4", "v5e", "v5p", "v6e")
# jax Device.device_kind of each generation (v5e and v6e report "lite").
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e"}

# MEASURED[(generation, head_dim)][tile] = (fwd_full, fwd_partial, fwd_row, fwd_step,
#                                          bwd_full, bwd_partial, bwd_row, bwd_step)
# in bundles, bwd = the dK/dV kernel that also computes dQ. A tile missing for a generation failed to compile
# (scoped VMEM). Measured with benchmarks/tpu_kernel_cost.py, JAX/libtpu 0.10.2, on a CPU host.
MEASURED: dict = {}

# Relative cost per score element of a square tile (512 = 1) for the length-only rule :func:`tpu_default_block`
# (generation unknown): the geometric mean over the measured generations at head dim 128 of the estimate of a
# dense 4096 x 4096 call per score element, forward + backward.
TILE_COST = {512: 1.0, 256: 1.4, 128: 1.9}


# ------------------------------------------------------------------------------------------------------------------
# Which generation.


def generation_of(device_kind: str) -> Optional[str]:
  """``"v5e"`` etc. for a jax ``Device.device_kind``; None for a kind not in :data:`DEVICE_KINDS`."""
  return DEVICE_KINDS.get(device_kind)


def detect_generation() -> Optional[str]:
  """The TPU generation being compiled for, or None: the devices of the mesh in scope (``jax.set_mesh``: an AOT
  compile for a TPU slice from a CPU host traces under the slice's mesh), else jax's default device when it is a
  TPU, else the first device when the default backend is TPU."""
  import jax
  devices = []
  try:  # the concrete mesh of jax.set_mesh; jax.sharding.get_mesh() refuses to be called while tracing
    from jax._src import mesh as mesh_lib
    mesh = mesh_lib.get_concrete_mesh()
    if mesh is not None and not mesh.empty:
      devices.append(mesh.devices.flat[0])
  except (ImportError, AttributeError):  # another jax: the default device and backend still tell
    pass
  default = jax.config.jax_default_device
  if default is not None and not isinstance(default, str):
    devices.append(default)
  if not devices and jax.default_backend() == "tpu":
    devices.append(jax.devices()[0])
  for dev in devices:
    if getattr(dev, "platform", None) == "tpu":
      return generation_of(dev.device_kind)
  return None


# ------------------------------------------------------------------------------------------------------------------
# The choice.


def _fit(tile: int, length: int) -> int:
  """``tile``, or one tile of ``length`` rounded up to 8 when the sequence is shorter."""
  return tile if length > tile else max(8, -(-length // 8) * 8)


def _kinds(classes: np.ndarray, q_len: int, kv_len: int, bq: int, bk: int):
  """(unmasked tiles, masked tiles, fwd width, dK/dV width) of a call, as the kernel's metadata counts them
  (edge tiles of a length that does not divide are masked)."""
  edge = np.zeros(classes.shape, bool)
  if q_len % bq:
    edge[-1, :] = True
  if kv_len % bk:
    edge[:, -1] = True
  visited = classes != masks_lib.EMPTY
  unmasked = visited & (classes == masks_lib.FULL) & ~edge
  fwd_width = max(1, int(visited.sum(axis=1).max()))
  dkv_width = max(1, int(visited.sum(axis=0).max()))
  return int(unmasked.sum()), int((visited & ~unmasked).sum()), fwd_width, dkv_width


def estimate(mask: masks_lib.Mask, q_len: int, kv_len: int, head_dim: int, generation: str, tile: int) -> float:
  """Bundles of forward + dK/dV/dQ for one (batch row, head) at square ``tile`` (:data:`MEASURED`)."""
  table = MEASURED[_key(generation, head_dim)]
  f_full, f_part, f_row, f_step, b_full, b_part, b_row, b_step = table[tile]
  bq, bk = _fit(tile, q_len), _fit(tile, kv_len)
  area = bq * bk / (tile * tile)
  classes = mask.block_classes(q_len, kv_len, block_q=bq, block_kv=bk)
  unmasked, masked, fwd_width, dkv_width = _kinds(classes, q_len, kv_len, bq, bk)
  nq, nk = classes.shape
  fwd = nq * fwd_width * f_step + nq * f_row + area * (unmasked * f_full + masked * f_part)
  bwd = nk * dkv_width * b_step + nk * b_row + area * (unmasked * b_full + masked * b_part)
  return float(fwd + bwd)


def _key(generation: str, head_dim: int):
  dims = sorted(d for g, d in MEASURED if g == generation and d >= head_dim)
  return (generation, dims[0]) if dims else None


def tpu_tiles(mask: masks_lib.Mask, q_len: int, kv_len: int, head_dim: int, *,
              generation: Optional[str] = None) -> tuple:
  """``(block_q, block_kv)`` for a call of the TPU kernels: the measured tile with the least :func:`estimate` for
  this generation, head dim, mask and lengths; :func:`tpu_default_block` for each length when the generation (or
  a measured head dim at least ``head_dim``) is not in :data:`MEASURED`. ``generation=None`` →
  :func:`detect_generation`."""
  if generation is None:
    generation = detect_generation()
  elif generation not in GENERATIONS:
    raise ValueError(f"generation={generation!r} is not a TPU generation; use one of {GENERATIONS} or None.")
  key = None if generation is None else _key(generation, head_dim)
  if key is None:
    return tpu_default_block(q_len), tpu_default_block(kv_len)
  costs = {t: estimate(mask, q_len, kv_len, head_dim, generation, t) for t in MEASURED[key]}
  best = min(costs, key=lambda t: (costs[t], -t))
  return _fit(best, q_len), _fit(best, kv_len)


def tpu_default_block(length: int) -> int:
  """The length-only tile rule (generation unknown): the candidate of :data:`TILE_COST` with the least
  ``padded_length ** 2 * TILE_COST[tile]`` (padding is computed and masked too); a sequence shorter than 128 is
  one tile of its length rounded up to 8."""
  if length < min(TILE_COST):
    return max(8, -(-length // 8) * 8)
  padded = lambda t: -(-length // t) * t
  return min(TILE_COST, key=lambda t: (padded(t) ** 2 * TILE_COST[t], -t))
