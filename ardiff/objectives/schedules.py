"""Noise draws for masked (absorbing-state) diffusion with the log-linear schedule ``alpha_t = 1 - t``.

Training draws one ``t`` per block (antithetic over batch x blocks; docs/algorithms.md §1–2) inside a clipped
interval ``[beta, omega]``; each maskable token is masked with probability ``move_chance(t)``. Evaluation uses the
*count* form of the same NELBO, which needs no ``eps`` truncation at all:

    ∫_0^1 (1/t) E_{x_t}[Σ_masked CE] dt  =  Σ_{k=1}^{m} (1/k) E_{|S|=k}[Σ_{l∈S} CE_l]  =  E_{k~U{1..m}} [(m/k) Σ_S CE]

(``∫ C(m,k) t^(k-1) (1-t)^(m-k) dt = 1/k``), where m is the number of maskable tokens of the block. It is an
unbiased, finite-variance estimate of the exact bound (LLaDA's likelihood estimator), so the reported NELBO is
an honest upper bound on the NLL in expectation.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def antithetic_uniform(rng: jax.Array, shape: Sequence[int]) -> jax.Array:
  """``U[0, 1)`` draws that are evenly spread: ``t_i = (u + i/N) mod 1`` over the flattened shape."""
  n = int(np.prod(shape))
  u = jax.random.uniform(rng, ())
  return jnp.mod(u + jnp.arange(n, dtype=jnp.float32) / n, 1.0).reshape(shape)


def sample_block_t(rng: jax.Array, batch: int, num_blocks: int, *, low: float, high: float,
                   antithetic: bool = True) -> jax.Array:
  """``float32[batch, num_blocks]`` noise levels in ``[low, high]``, one per block."""
  if antithetic:
    u = antithetic_uniform(rng, (batch, num_blocks))
  else:
    u = jax.random.uniform(rng, (batch, num_blocks))
  return low + (high - low) * u


def move_chance(t: jax.Array, weighting: str, eps: float) -> jax.Array:
  """Masking probability for noise level t: ``t`` for the NELBO schedule, ``(1-eps) t + eps`` (LLaDA/SDAR's
  p_mask) for the other weightings."""
  if weighting == "nelbo":
    return t
  return (1.0 - eps) * t + eps


def loss_weight(p_mask: jax.Array, weighting: str) -> jax.Array:
  """Per-token weight: ``1/t`` (NELBO) or ``1/p_mask`` are both ``1/move_chance``; 'none' is 1."""
  if weighting == "none":
    return jnp.ones_like(p_mask)
  return 1.0 / p_mask


def candidate_intervals(widths: Iterable[float] = (0.5, 0.6, 0.7, 0.8, 0.9), delta: float = 0.05,
                        eps: float = 1e-3) -> list[tuple[float, float]]:
  """BD3-LM's clipped-schedule search space: ``[lo, lo + w]`` for each width, ``lo`` on a ``delta`` grid."""
  out = []
  for w in widths:
    if not 0.0 < w <= 1.0:
      raise ValueError(f"clip width {w} must lie in (0, 1].")
    for lo in np.arange(0.0, 1.0 - w + 1e-9, delta):
      out.append((round(max(float(lo), eps), 6), round(min(float(lo) + w, 1.0), 6)))  # only lo is clamped
  return sorted(set(out))


def select_min_variance(per_block_losses: dict) -> tuple[tuple[float, float], dict]:
  """Pick the interval whose per-block NELBO samples have the smallest variance.

  ``per_block_losses`` maps ``(beta, omega)`` to an array of per-block NELBO values gathered over validation
  batches. Returns the best interval and ``{interval: variance}``.
  """
  if not per_block_losses:
    raise ValueError("select_min_variance needs at least one candidate interval with samples.")
  variances = {k: float(np.var(np.asarray(v, np.float64))) for k, v in per_block_losses.items()}
  best = min(variances, key=variances.get)
  return best, variances
