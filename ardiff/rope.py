"""Rotary position embeddings, Hugging Face convention, with the RoPE scaling types of Llama 3.x and long-context
checkpoints.

``rope_scaling`` is ``None`` (plain RoPE) or a mapping with ``rope_type`` and that type's parameters, named as in
``transformers``' ``rope_parameters``:

==========  ===============================================================================================
type        parameters (inverse frequencies ``f_i = theta^(-2i/d)``)
==========  ===============================================================================================
linear      ``factor``: ``f_i / factor``
dynamic     ``factor``, ``max_position_embeddings``: NTK base ``theta * (factor*n/max - (factor-1))^(d/(d-2))``
            with ``n = max(largest position of the forward + 1, max_position_embeddings)``
yarn        ``factor``, ``original_max_position_embeddings``, optional ``beta_fast`` (32), ``beta_slow`` (1),
            ``attention_factor``, ``mscale``, ``mscale_all_dim``, ``truncate`` (True): per-frequency blend of
            ``f_i`` and ``f_i/factor`` over a linear ramp, cos/sin scaled by the attention factor
llama3      ``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``:
            long wavelengths divided by ``factor``, short ones kept, a smooth blend in between
==========  ===============================================================================================

The static types are computed once on the host in float64 and cast to float32 (``transformers`` does float32
arithmetic; the two agree to ~1e-7 relative). ``dynamic`` depends on the forward's positions, so it is traced:
like ``transformers`` on a fresh model, each forward uses its own largest position (``transformers`` additionally
keeps a grown base across later, shorter calls; ardiff does not carry state between forwards).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor", "max_position_embeddings"),
             "yarn": ("factor", "original_max_position_embeddings"),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
_OPTIONAL = {"linear": (), "dynamic": (), "llama3": (),
             "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")}


def check_scaling(scaling: Optional[Mapping[str, Any]], where: str = "model.rope_scaling") -> None:
  """Raises ValueError naming the problem when ``scaling`` is not a RoPE scaling ardiff computes exactly."""
  if scaling is None:
    return
  rope_type = scaling.get("rope_type")
  if rope_type not in ROPE_TYPES or rope_type == "default":
    raise ValueError(f"{where}: rope_type={rope_type!r} must be one of {ROPE_TYPES[1:]} (or no scaling at all).")
  missing = [k for k in _REQUIRED[rope_type] if scaling.get(k) is None]
  if missing:
    raise ValueError(f"{where}: rope_type {rope_type!r} needs {', '.join(missing)} (got {dict(scaling)}).")
  unknown = set(scaling) - {"rope_type"} - set(_REQUIRED[rope_type]) - set(_OPTIONAL[rope_type])
  if unknown:
    raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for rope_type {rope_type!r}; known: "
                     f"{sorted(_REQUIRED[rope_type] + _OPTIONAL[rope_type])}.")
  if float(scaling["factor"]) <= 0:
    raise ValueError(f"{where}: factor={scaling['factor']} must be > 0.")
  if rope_type == "llama3" and float(scaling["high_freq_factor"]) <= float(scaling["low_freq_factor"]):
    raise ValueError(f"{where}: llama3 needs high_freq_factor > low_freq_factor (got {dict(scaling)}).")


def _base_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  return 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def _llama3(inv: np.ndarray, s: Mapping) -> np.ndarray:
  factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
  old = float(s["original_max_position_embeddings"])
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > old / low, inv / factor, inv)  # long wavelengths: interpolate by `factor`
  smooth = (old / wavelen - low) / (high - low)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old / high) & (wavelen <= old / low)
  return np.where(medium, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv: np.ndarray, s: Mapping, head_dim: int, theta: float):
  factor = float(s["factor"])
  orig = float(s["original_max_position_embeddings"])
  attention_factor = s.get("attention_factor")
  if attention_factor is None:
    mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
    attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                        else _yarn_mscale(factor))
  beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

  def correction_dim(rotations):  # the dimension whose wavelength makes `rotations` turns over `orig` positions
    return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if s.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # as transformers: avoid a zero-width ramp
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  keep = 1 - ramp  # 1: extrapolate (keep f_i), 0: interpolate (f_i / factor)
  return inv / factor * (1 - keep) + inv * keep, float(attention_factor)


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[Mapping[str, Any]] = None,
                        positions: Optional[jax.Array] = None):
  """``(inv_freq [head_dim/2] float32, cos/sin scale)``; ``positions`` is needed by ``dynamic`` only."""
  if scaling is None:
    return jnp.asarray(_base_inv_freq(head_dim, theta), jnp.float32), 1.0
  rope_type = scaling["rope_type"]
  inv = _base_inv_freq(head_dim, theta)
  if rope_type == "linear":
    return jnp.asarray(inv / float(scaling["factor"]), jnp.float32), 1.0
  if rope_type == "llama3":
    return jnp.asarray(_llama3(inv, scaling), jnp.float32), 1.0
  if rope_type == "yarn":
    inv, scale = _yarn(inv, scaling, head_dim, theta)
    return jnp.asarray(inv, jnp.float32), scale
  if rope_type == "dynamic":
    if positions is None:
      raise ValueError("dynamic RoPE scaling needs the forward's positions.")
    factor, max_pos = float(scaling["factor"]), float(scaling["max_position_embeddings"])
    n = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1, max_pos)
    base = theta * (factor * n / max_pos - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (base ** exponents), 1.0
  raise ValueError(f"rope_type={rope_type!r} must be one of {ROPE_TYPES}.")


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               scaling: Optional[Mapping[str, Any]] = None) -> jax.Array:
  """Rotary embedding, Hugging Face convention (rotate half: pairs are (i, i + d/2)), computed in float32.

  ``x``: ``[batch, length, heads, head_dim]``; ``positions``: ``[batch, length]``; ``scaling``: see the module
  docstring (None: plain RoPE).
  """
  d = x.shape[-1]
  if scaling is None:  # plain RoPE: the original arithmetic, unchanged bit for bit
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scale = 1.0
  else:
    inv_freq, scale = inverse_frequencies(d, theta, scaling, positions)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., d // 2:], xf[..., :d // 2]], axis=-1)
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  if scale != 1.0:  # yarn's attention factor scales cos and sin (so q.k by its square)
    cos, sin = cos * scale, sin * scale
  return (xf * cos + rotated * sin).astype(x.dtype)
