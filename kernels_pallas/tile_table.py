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
  + the same over the transposed lists, plus the dQ accumulator's init and finalize once (dK/dV + dQ),

per (batch row, head), exactly the estimate the benchmark prints, for the call's own mask and lengths, and takes
the cheapest. Padding is visited and masked like any partial tile, so a tile that does not divide the length pays
for it. A length shorter than a candidate tile makes that tile one tile of the length (rounded up to 8), its
bodies scaled by the area.

The generation comes from the devices being compiled for (:func:`detect_generation`). When it is not known (the
Pallas interpreter on a CPU host, an unlisted device kind, or a head dim above the measured ones) the choice is
:func:`tpu_default_block`, a length-only rule over tiles up to 512, which compile on every generation within the
default scoped VMEM at head dims up to 256. A head dim between measured ones uses the next larger measured one
(its costs are an upper bound).

Checked against calls the table was not built from (causal, ``--head-dim 128``/``64``): v6e T = 4096 predicted
0.810 / 0.786 M bundles at 512 / 1024 tiles, measured 0.810 / 0.786 (1024 wins there: v6e's 1024 tile costs less
per element than its 512 tile, v5e's does not); v6e T = 2048 predicted 0.238 / 0.254, measured 0.236 / 0.252; v5e
d = 64 T = 2048 at 256 / 512 predicted 0.500 / 0.340, measured 0.496 / 0.336 (the dQ accumulator's init and
finalize, measured at T = 4096, shrink with the length; the ranking holds).

Why the DMA tile is not separate from the compute sub-tile (splash's ``block_kv_compute``): nothing measured
needs it or gains from it. Scoped VMEM a call holds (every window double-buffered plus scratch, read from libtpu's
allocation dump; v5e, T = 4096, d = 128): 512 tiles: forward 3.8 MiB, dK/dV+dQ 8.1 MiB; 1024 tiles: forward
11.6 MiB, dK/dV+dQ 16.2 MiB, of which 8 MiB is the partial-tile table (Mosaic keeps the bool table as 32-bit in
VMEM: 4 MiB per 1024 x 1024 window). Every tile up to 1024 compiled at head dims 64 and 128 on v5e, v6e and v5p
within the default limits. Larger tiles do not pay: a grid step's fixed overhead is 48-75 bundles (v5p 115-236)
against 1,140-2,300 for a 512 tile's body, so 1024 DMA tiles over 512 compute sub-tiles could save at most ~4% of
a call, while on banded masks (BD3) a coarser DMA tile visits more empty area (BD3 T = 4096: 1024 tiles cost
(v5e: 1.22-1.23x, v6e: 1.14-1.16x the 512 ones). Above head dim 128 (not measured) the table is not used and
tiles stay at most 512.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ardiff import masks as masks_lib

GENERATIONS = ("v4", "v5e", "v5p", "v6e")
# jax Device.device_kind of each generation (v5e and v6e report "lite").
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e"}

# TensorCores per chip. On the megacore chips (v4, v5p) the kernels' parallel grid dimensions are split over two
# cores: each runs half the grid steps and half the tiles, so a chip's time is half the sum over the grid.
CORES = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}

# MEASURED[(generation, head_dim)][tile] = (fwd_full, fwd_partial, fwd_row, fwd_step,
#                                          bwd_full, bwd_partial, bwd_row, bwd_step, bwd_once)
# in bundles, bwd = the dK/dV kernel that also computes dQ; bwd_once = its dQ accumulator's init + finalize, run
# once per (batch row, kv head) (at T = 4096: it scales with the length). A tile missing for a generation failed to
# compile (scoped VMEM); none did at head dim <= 128, T = 4096. Measured with benchmarks/tpu_kernel_cost.py,
# JAX/libtpu 0.10.2, on a CPU host. Per-step overhead on v5p is per core step (megacore bookkeeping: 115-236).
MEASURED: dict = {
    ('v5e', 64): {
        128: (246, 271, 204, 48, 307, 340, 46, 75, 1038),
        256: (492, 552, 363, 49, 872, 894, 109, 74, 1038),
        512: (1140, 1218, 711, 49, 2293, 2568, 237, 74, 1038),
        1024: (5028, 4917, 1396, 49, 9281, 9483, 493, 74, 1038),
    },
    ('v5e', 128): {
        128: (247, 271, 204, 48, 322, 352, 30, 75, 824),
        256: (492, 549, 356, 49, 861, 867, 78, 74, 824),
        512: (1147, 1221, 692, 49, 2303, 2491, 177, 74, 824),
        1024: (5047, 4970, 1393, 49, 9133, 9156, 374, 74, 824),
    },
    ('v5p', 64): {
        128: (246, 273, 205, 214, 315, 345, 51, 235, 1038),
        256: (515, 547, 356, 215, 873, 893, 121, 236, 1038),
        512: (1150, 1215, 708, 215, 2297, 2572, 249, 236, 1038),
        1024: (5116, 4956, 1409, 215, 8983, 9183, 505, 236, 1038),
    },
    ('v5p', 128): {
        128: (250, 272, 205, 115, 314, 346, 36, 235, 824),
        256: (514, 546, 351, 116, 791, 873, 91, 236, 824),
        512: (1140, 1224, 697, 116, 2260, 2492, 190, 236, 824),
        1024: (5040, 5128, 1395, 116, 9199, 9156, 387, 236, 824),
    },
    ('v6e', 64): {
        128: (222, 218, 145, 48, 299, 303, 25, 75, 610),
        256: (531, 543, 261, 49, 793, 797, 50, 74, 610),
        512: (905, 981, 465, 49, 1480, 1600, 120, 74, 610),
        1024: (3140, 3635, 823, 49, 5360, 6013, 259, 74, 610),
    },
    ('v6e', 128): {
        128: (220, 216, 143, 48, 299, 303, 21, 75, 568),
        256: (530, 543, 259, 49, 796, 800, 40, 74, 568),
        512: (909, 998, 464, 49, 1496, 1617, 104, 74, 568),
        1024: (3203, 3845, 822, 49, 5407, 6117, 229, 74, 568),
    },
}

# Relative cost per score element of a square tile (512 = 1) for the length-only rule :func:`tpu_default_block`
# (generation unknown): the geometric mean over the measured generations at head dim 128 of the estimate of a
# causal 4096 x 4096 call (:func:`estimate`), forward + backward, relative to 512.
# v5e 3.08 / 1.58, v5p 4.29 / 1.79, v6e 4.01 / 2.15 (128 / 256, causal, T = 4096); 1024 is left out: it has not been
# compiled at head dims above 128.
TILE_COST = {512: 1.0, 256: 1.82, 128: 3.75}


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
  """Bundles of forward + dK/dV/dQ per chip for one (batch row, head) at square ``tile`` (:data:`MEASURED`;
  megacore chips split the work over :data:`CORES`)."""
  table = MEASURED[_key(generation, head_dim)]
  f_full, f_part, f_row, f_step, b_full, b_part, b_row, b_step, b_once = table[tile]
  bq, bk = _fit(tile, q_len), _fit(tile, kv_len)
  area = bq * bk / (tile * tile)
  classes = mask.block_classes(q_len, kv_len, block_q=bq, block_kv=bk)
  unmasked, masked, fwd_width, dkv_width = _kinds(classes, q_len, kv_len, bq, bk)
  nq, nk = classes.shape
  fwd = nq * fwd_width * f_step + nq * f_row + area * (unmasked * f_full + masked * f_part)
  bwd = nk * dkv_width * b_step + nk * b_row + b_once + area * (unmasked * b_full + masked * b_part)
  return float(fwd + bwd) / CORES[generation]


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
