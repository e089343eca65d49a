"""ACDiT-style DiT over continuous patch tokens: adaLN-Zero time/class conditioning, 2-D RoPE, ardiff's attention.

The network maps patch vectors ``x [batch, length, patch_dim]`` with per-token flow times ``t [batch, length]``
(1 = clean) and class labels ``[batch]`` (``IMAGE_CLASSES`` = the null class of classifier-free guidance) to
velocities ``[batch, length, patch_dim]``. Like :class:`ardiff.model.Transformer` it takes a static mask from
:mod:`ardiff.masks` (``BD3(n, B)`` over ``[noisy ; clean]`` in training: ACDiT's SCAM with its halves swapped,
``BlockCausal(B)`` against a cache at sampling) and an optional :class:`ardiff.model.KVCache`, with the same
contract: the forward writes the new tokens' K/V at the cache's ``lengths`` and never advances them.

Conditioning (DiT's adaLN-Zero, per token because each block has its own t): ``c = time_embed(t) +
class_embed(y)``; each layer's residual branches are ``x + gate * f(LN(x) * (1 + scale) + shift)`` with shift,
scale and gate from ``Dense(silu(c))`` initialised at zero, and the output layer is zero-initialised too, so a fresh
model predicts velocity 0 (the loss is then ``E|x - eps|^2``: a hand-checkable value).

Positions: a patch at grid (row, col) rotates the first half of each head's dimensions by ``row`` and the second
half by ``col`` (:func:`rope_2d`), HF rotate-half convention inside each half.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ardiff import attention as attention_lib
from ardiff import masks as masks_lib
from ardiff.config import ModelConfig
from ardiff.model import KVCache, apply_rope
from ardiff.sections import IMAGE_CLASSES


def rope_2d(x: jax.Array, rows: jax.Array, cols: jax.Array, theta: float) -> jax.Array:
  """``x [batch, length, heads, head_dim]`` (head_dim divisible by 4), ``rows``/``cols [batch, length]``."""
  d = x.shape[-1]
  if d % 4:
    raise ValueError(f"2-D RoPE needs head_dim divisible by 4 (two rotary halves), got {d}.")
  return jnp.concatenate([apply_rope(x[..., :d // 2], rows, theta), apply_rope(x[..., d // 2:], cols, theta)], -1)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of ``t [...]`` (scaled by 1000, as DiT's integer steps) -> ``float32[..., dim]``."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Output(NamedTuple):
  velocity: jax.Array  # float32 [batch, length, patch_dim]
  cache: Optional[KVCache]


def _modulate(x, shift, scale):
  return x * (1.0 + scale) + shift


class _Attention(nn.Module):
  config: ModelConfig
  mask: masks_lib.Mask

  @nn.compact
  def __call__(self, x, rows, cols, cache_k, cache_v, lengths):
    """``x [batch, length, embed]`` -> (``[batch, length, embed]``, new (k, v) or None)."""
    cfg = self.config
    dense = lambda n, name: nn.DenseGeneral((n, cfg.head_dim), use_bias=False, name=name,
                                            kernel_init=nn.initializers.normal(cfg.init_std))
    q = rope_2d(dense(cfg.num_heads, "q_proj")(x), rows, cols, cfg.rope_theta)
    k = rope_2d(dense(cfg.num_kv_heads, "k_proj")(x), rows, cols, cfg.rope_theta)
    v = dense(cfg.num_kv_heads, "v_proj")(x)
    new_kv = None
    if cache_k is None:
      out = attention_lib.attention(q, k, v, mask=self.mask, impl=cfg.attention_impl)
    else:  # write this forward's K/V at each row's committed length (not advanced), attend to prefix + itself
      write = jax.vmap(lambda c, new, s: jax.lax.dynamic_update_slice(c, new.astype(c.dtype), (s, 0, 0)))
      cache_k, cache_v = write(cache_k, k, lengths), write(cache_v, v, lengths)
      new_kv = (cache_k, cache_v)
      out = attention_lib.attention(q, cache_k, cache_v, mask=self.mask, impl=cfg.attention_impl,
                                    q_offsets=lengths, kv_lengths=lengths + x.shape[1])
    return nn.DenseGeneral(cfg.embed_dim, axis=(-2, -1), use_bias=False, name="o_proj",
                           kernel_init=nn.initializers.normal(cfg.init_std))(out), new_kv


class DiTBlock(nn.Module):
  config: ModelConfig
  mask: masks_lib.Mask

  @nn.compact
  def __call__(self, x, c, rows, cols, cache_k, cache_v, lengths):
    cfg = self.config
    mod = nn.Dense(6 * cfg.embed_dim, name="adaln", kernel_init=nn.initializers.zeros)(nn.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    norm = lambda name: nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-6, name=name)
    h, new_kv = _Attention(cfg, self.mask, name="attn")(_modulate(norm("norm1")(x), shift1, scale1), rows, cols,
                                                        cache_k, cache_v, lengths)
    x = x + gate1 * h
    h = _modulate(norm("norm2")(x), shift2, scale2)
    h = nn.Dense(cfg.mlp_dim, name="fc1", kernel_init=nn.initializers.normal(cfg.init_std))(h)
    h = nn.Dense(cfg.embed_dim, name="fc2", kernel_init=nn.initializers.normal(cfg.init_std))(nn.gelu(h))
    return x + gate2 * h, new_kv


class ACDiT(nn.Module):
  """``apply({'params': p}, x, t, labels, rows=, cols=, mask=, cache=) -> Output``.

  ``x [batch, length, patch_dim]``, ``t [batch, length]`` in [0, 1] (1 = clean), ``labels int[batch]`` (10 = null),
  ``rows``/``cols int[batch, length]`` the patches' grid coordinates."""

  config: ModelConfig
  patch_dim: int

  @nn.compact
  def __call__(self, x, t, labels, *, rows, cols, mask: masks_lib.Mask, cache: Optional[KVCache] = None) -> Output:
    cfg = self.config
    d = cfg.embed_dim
    h = nn.Dense(d, name="patch_in", kernel_init=nn.initializers.normal(cfg.init_std))(x.astype(jnp.float32))
    temb = nn.Dense(d, name="time_mlp_2")(nn.silu(nn.Dense(d, name="time_mlp_1")(timestep_embedding(t, d))))
    yemb = nn.Embed(IMAGE_CLASSES + 1, d, name="class_embed",
                    embedding_init=nn.initializers.normal(cfg.init_std))(labels)
    c = temb + yemb[:, None, :]
    new_k, new_v = [], []
    for i in range(cfg.num_layers):
      layer_cache = (cache.k[i], cache.v[i], cache.lengths) if cache is not None else (None, None, None)
      h, kv = DiTBlock(cfg, mask, name=f"layers_{i}")(h, c, rows, cols, *layer_cache)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    shift, scale = jnp.split(nn.Dense(2 * d, name="final_adaln", kernel_init=nn.initializers.zeros)(nn.silu(c)), 2,
                             axis=-1)
    h = _modulate(nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-6, name="final_norm")(h), shift, scale)
    v = nn.Dense(self.patch_dim, name="patch_out", kernel_init=nn.initializers.zeros)(h)
    new_cache = cache.replace(k=jnp.stack(new_k), v=jnp.stack(new_v)) if cache is not None else None
    return Output(v.astype(jnp.float32), new_cache)


def grid_positions(num_patches: int, batch: int = 1):
  """``(rows, cols)`` ``int32[batch, num_patches]`` of patches in raster order on a square grid."""
  g = math.isqrt(num_patches)
  if g * g != num_patches:
    raise ValueError(f"{num_patches} patches do not form a square grid.")
  idx = jnp.arange(num_patches, dtype=jnp.int32)
  return jnp.broadcast_to(idx // g, (batch, num_patches)), jnp.broadcast_to(idx % g, (batch, num_patches))


def init_params(model: ACDiT, rng, num_patches: int):
  """Parameters for images of ``num_patches`` patches (jitted: an eager init dispatches op by op)."""
  def init(r):
    x = jnp.zeros((1, num_patches, model.patch_dim), jnp.float32)
    rows, cols = grid_positions(num_patches)
    return model.init(r, x, jnp.ones((1, num_patches)), jnp.zeros((1,), jnp.int32), rows=rows, cols=cols,
                      mask=masks_lib.Full())["params"]
  return jax.jit(init)(rng)
