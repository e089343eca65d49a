"""Host-side sparsity metadata for the block-sparse flash-attention kernels.

Built once per static ``(mask, q_len, kv_len, block_q, block_kv)`` from ``mask.block_classes`` (cached), in the
"grid shrinking" form of Splash attention (docs/algorithms.md §3.6):

* forward / dQ pass, per query tile ``i``: ``fwd_kv_index[i, :fwd_count[i]]`` are the non-empty kv tiles packed to
  the left; the padding repeats the last listed tile (so a grid step past the count maps to the block the previous
  step already holds and the pipeline issues no DMA); ``fwd_kind[i, j]`` is ``MASKED`` (evaluate the elementwise
  predicate) or ``UNMASKED`` (every in-range element allowed: no ``where``), ``PAD`` past the count;
* dK/dV pass, per kv tile ``j``: the transposed lists ``dkv_q_index``/``dkv_kind``/``dkv_count``.

Ragged edge tiles (a length that does not divide by the tile) are always ``MASKED``: the kernel pads the sequences
internally and must mask the padded keys and queries even where ``block_classes`` says ``FULL``.

Masks whose predicate cannot run inside a kernel (``masks.Explicit`` and compositions with it: the predicate
gathers from a captured table) get a deduplicated table of the masked tiles, ``partial_blocks[n, bq, bk]`` (and its
transpose for the dK/dV pass), indexed by ``fwd_block_id``/``dkv_block_id``; structured masks evaluate
``mask.predicate`` on iotas in the kernel and need no table.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np

from ardiff import masks as masks_lib
from kernels_pallas import common

PAD, MASKED, UNMASKED = 0, 1, 2


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparseMetadata:
  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  classes: np.ndarray          # int8 [nq, nk]: masks.EMPTY / PARTIAL / FULL
  fwd_kv_index: np.ndarray     # int32 [nq, fwd_width]
  fwd_kind: np.ndarray         # int32 [nq, fwd_width]: PAD / MASKED / UNMASKED
  fwd_count: np.ndarray        # int32 [nq]
  fwd_block_id: np.ndarray     # int32 [nq, fwd_width]: index into partial_blocks (table masks only)
  dkv_q_index: np.ndarray      # int32 [nk, dkv_width]
  dkv_kind: np.ndarray         # int32 [nk, dkv_width]
  dkv_count: np.ndarray        # int32 [nk]
  dkv_block_id: np.ndarray     # int32 [nk, dkv_width]
  partial_blocks: Optional[np.ndarray]  # bool [n, bq, bk] (True = allowed) or None when the predicate runs in-kernel

  @property
  def num_q_tiles(self) -> int:
    return self.classes.shape[0]

  @property
  def num_kv_tiles(self) -> int:
    return self.classes.shape[1]

  @property
  def fwd_width(self) -> int:
    return self.fwd_kv_index.shape[1]

  @property
  def dkv_width(self) -> int:
    return self.dkv_q_index.shape[1]

  @property
  def num_nonempty(self) -> int:
    return int(np.count_nonzero(self.classes != masks_lib.EMPTY))

  @property
  def tile_density(self) -> float:
    return self.num_nonempty / self.classes.size

  @property
  def padded_q_len(self) -> int:
    return self.num_q_tiles * self.block_q

  @property
  def padded_kv_len(self) -> int:
    return self.num_kv_tiles * self.block_kv


def _pack(classes: np.ndarray, edge_masked: np.ndarray):
  """Per row of ``classes`` (int8 [rows, cols]): packed non-empty column indices, kinds, counts."""
  rows, cols = classes.shape
  nonempty = classes != masks_lib.EMPTY
  count = nonempty.sum(axis=1).astype(np.int32)
  width = max(1, int(count.max()) if rows else 1)
  index = np.zeros((rows, width), np.int32)
  kind = np.full((rows, width), PAD, np.int32)
  last = 0
  for r in range(rows):
    cs = np.flatnonzero(nonempty[r])
    if cs.size:
      index[r, :cs.size] = cs
      kind[r, :cs.size] = np.where((classes[r, cs] == masks_lib.FULL) & ~edge_masked[r, cs], UNMASKED, MASKED)
      last = cs[-1]
    index[r, cs.size:] = last  # revisit the block the previous step holds: no new DMA
  return index, kind, count


@functools.lru_cache(maxsize=64)
def build_metadata(mask: masks_lib.Mask, q_len: int, kv_len: int, block_q: int, block_kv: int,
                   table: Optional[bool] = None) -> BlockSparseMetadata:
  """Metadata for ``mask`` over ``q_len`` queries and ``kv_len`` keys in ``(block_q, block_kv)`` tiles (cached).

  ``table=None`` decides from the mask whether the predicate can run in the kernel.
  """
  if table is None:
    table = not common.predicate_runs_in_kernel(mask)
  classes = mask.block_classes(q_len, kv_len, block_q=block_q, block_kv=block_kv)
  nq, nk = classes.shape
  edge = np.zeros((nq, nk), bool)
  if q_len % block_q:
    edge[-1, :] = True
  if kv_len % block_kv:
    edge[:, -1] = True
  fwd_index, fwd_kind, fwd_count = _pack(classes, edge)
  dkv_index, dkv_kind, dkv_count = _pack(classes.T.copy(), edge.T.copy())

  fwd_block_id = np.zeros_like(fwd_index)
  dkv_block_id = np.zeros_like(dkv_index)
  partial = None
  if table:
    blocks, ids = [], {}
    tile_id = {}
    for i in range(nq):
      for j in range(nk):
        if classes[i, j] != masks_lib.EMPTY and (classes[i, j] != masks_lib.FULL or edge[i, j]):
          # One tile at a time (host memory O(tile), not O(q_len * kv_len)); past the lengths is masked.
          tile = np.zeros((block_q, block_kv), bool)
          rows, cols = min(block_q, q_len - i * block_q), min(block_kv, kv_len - j * block_kv)
          tile[:rows, :cols] = mask.dense(rows, cols, q_offset=i * block_q, kv_offset=j * block_kv)
          key = tile.tobytes()
          if key not in ids:
            ids[key] = len(blocks)
            blocks.append(tile)
          tile_id[i, j] = ids[key]
    if not blocks:
      blocks.append(np.zeros((block_q, block_kv), bool))
    partial = np.stack(blocks)

    def fill(index, kind, out, transpose):
      last = 0
      for r in range(index.shape[0]):
        for c in range(index.shape[1]):
          if kind[r, c] == MASKED:
            last = tile_id[(index[r, c], r) if transpose else (r, index[r, c])]
          out[r, c] = last  # unmasked / padded steps keep the previous block: no new DMA

    fill(fwd_index, fwd_kind, fwd_block_id, False)
    fill(dkv_index, dkv_kind, dkv_block_id, True)

  meta = BlockSparseMetadata(
      q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, classes=classes,
      fwd_kv_index=fwd_index, fwd_kind=fwd_kind, fwd_count=fwd_count, fwd_block_id=fwd_block_id,
      dkv_q_index=dkv_index, dkv_kind=dkv_kind, dkv_count=dkv_count, dkv_block_id=dkv_block_id,
      partial_blocks=partial)
  for arr in (classes, fwd_index, fwd_kind, fwd_count, fwd_block_id, dkv_index, dkv_kind, dkv_count,
              dkv_block_id) + ((partial,) if partial is not None else ()):
    arr.setflags(write=False)
  return meta
