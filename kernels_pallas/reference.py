"""The dense masked-softmax attention every kernel (and the model's XLA path) is tested against: pure ``jnp``.

Shapes: ``q`` is ``[batch, q_len, heads, head_dim]``; ``k`` and ``v`` are
``[batch, kv_len, kv_heads, head_dim]`` with ``kv_heads`` dividing ``heads`` (GQA: query head ``i`` reads kv head
``i // (heads // kv_heads)``).

Which keys a query sees is decided by three terms, all elementwise over absolute indices:

* the static mask from :mod:`ardiff.masks`, evaluated at ``q = q_offsets[b] + i`` and ``k = j``;
* packing: ``q_segment_ids[b, i] == kv_segment_ids[b, j] != 0`` (when segment ids are given);
* the cache: ``j < kv_lengths[b]`` (when ``kv_lengths`` is given; keys past it are stale or unwritten).

Rows that see no key output zeros (never NaN), and their gradients are zero.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ardiff import masks as masks_lib
from kernels_pallas.common import NEG_INF


def allowed_bqk(mask: masks_lib.Mask, *, batch: int, q_len: int, kv_len: int, q_offsets=None,
                q_segment_ids=None, kv_segment_ids=None, kv_lengths=None) -> jax.Array:
  """``bool[batch or 1, q_len, kv_len]``: the full elementwise mask (static mask & packing & cache validity)."""
  del batch  # the leading dim broadcasts: 1 unless a per-row term (offsets, segments, lengths) is given
  q_idx = jnp.arange(q_len, dtype=jnp.int32)[None, :, None]
  if q_offsets is not None:
    q_idx = q_idx + jnp.asarray(q_offsets, jnp.int32).reshape(-1, 1, 1)
  k_idx = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
  allowed = mask.predicate(q_idx, k_idx)
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("Pass both q_segment_ids and kv_segment_ids, or neither.")
  if q_segment_ids is not None:
    allowed = allowed & masks_lib.segment_predicate(q_segment_ids[:, :, None], kv_segment_ids[:, None, :])
  if kv_lengths is not None:
    allowed = allowed & (k_idx < jnp.asarray(kv_lengths, jnp.int32).reshape(-1, 1, 1))
  return jnp.broadcast_to(allowed, (allowed.shape[0], q_len, kv_len))


def reference_attention(q, k, v, *, mask: masks_lib.Mask, q_offsets=None, q_segment_ids=None,
                        kv_segment_ids=None, kv_lengths=None, sm_scale: Optional[float] = None,
                        logit_soft_cap: Optional[float] = None) -> jax.Array:
  """Dense masked softmax attention in float32 (see the module docstring); ``[batch, q_len, heads, head_dim]`` in
  q's dtype."""
  check_shapes(q, k, v)
  b, t, h, d = q.shape
  _, s, kvh, _ = k.shape
  groups = h // kvh
  scale = d ** -0.5 if sm_scale is None else sm_scale
  q_grouped = q.reshape(b, t, kvh, groups, d)  # query head i reads kv head i // groups
  logits = jnp.einsum("btkgd,bskd->bkgts", q_grouped, k, preferred_element_type=jnp.float32) * scale
  if logit_soft_cap is not None:
    logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
  allowed = allowed_bqk(mask, batch=b, q_len=t, kv_len=s, q_offsets=q_offsets, q_segment_ids=q_segment_ids,
                        kv_segment_ids=kv_segment_ids, kv_lengths=kv_lengths)[:, None, None]  # [b|1,1,1,t,s]
  # A finite fill and an explicit zero for masked entries: fully masked rows give 0, not NaN, and 0 gradients.
  logits = jnp.where(allowed, logits, NEG_INF)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  p = jnp.where(allowed, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
  return out.reshape(b, t, h, d).astype(q.dtype)


def check_shapes(q, k, v) -> None:
  """Raise a ValueError naming the shapes unless q ``[b, t, h, d]`` and k, v ``[b, s, kvh, d]`` with ``kvh | h``."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects [batch, len, heads, head_dim] inputs; got q{q.shape} k{k.shape} "
                     f"v{v.shape}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}.")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim.")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"kv_heads={k.shape[2]} must divide heads={q.shape[2]} (grouped-query attention).")
