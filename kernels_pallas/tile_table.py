"""Default TPU tile sizes of the block-sparse attention kernels, from the compiler's static cost.

``benchmarks/tpu_kernel_cost.py`` compiles the kernels for TPU generations on a CPU host (libtpu AOT) and counts the
scheduled VLIW bundles of each kernel's per-tile loop. On v5e and v6e (T = 4096, d = 128, causal and BD3 masks,
forward + dQ + dK/dV), 128 x 128 tiles cost 1.9-3x the cycles of 512 x 512 tiles: a grid step has a fixed overhead
(index maps, DMA issue and wait, pipeline bookkeeping) and a small tile keeps the MXU pipeline shallow. Larger tiles
also read K/V fewer times. 512 is the largest tile measured to compile on every generation within the default
scoped VMEM at d <= 256; the generation does not change the choice on the measured shapes, so the table is keyed
by length only.
"""

from __future__ import annotations

# Relative cost per score element of a square tile (512 = 1). 128: measured 1.9-3x on v5e/v6e at T = 4096 (the low
# end is used: sparse masks gain less); 256: not yet measured, placed between.
TILE_COST = {512: 1.0, 256: 1.4, 128: 1.9}


def tpu_default_block(length: int) -> int:
  """The TPU tile for a sequence of ``length`` (queries or keys): the candidate with the least estimated cost
  ``padded_length ** 2 * TILE_COST[tile]`` (padding is computed and masked too); a sequence shorter than 128 is one
  tile of its length rounded up to 8."""
  if length < min(TILE_COST):
    return max(8, -(-length // 8) * 8)
  padded = lambda t: -(-length // t) * t
  return min(TILE_COST, key=lambda t: (padded(t) ** 2 * TILE_COST[t], -t))
