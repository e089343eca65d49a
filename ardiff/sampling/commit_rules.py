"""Block-diffusion commit rules: which masked positions of a block a denoising step commits (docs/algorithms.md
§4.2–4.3).

Pure functions of per-position scores, shared by the cached sampler (:mod:`ardiff.sampling.block_diffusion`) and
the uncached reference (:mod:`ardiff.sampling.reference`). Shapes: ``b`` rows, ``B`` block positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STRATEGIES = ("first_hitting", "ddpm_cache", "topk_confidence", "threshold", "factor", "dynamic",
              "entropy_bounded")


def _ranks(score, valid):
  """Rank (0 = best = highest score) among ``valid`` entries along the last axis; invalid ones rank last."""
  s = jnp.where(valid, score, -jnp.inf)
  order = jnp.argsort(-s, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True), jnp.take_along_axis(s, order, axis=-1)


def commit_mask(strategy: str, *, masked, conf, entropy, rand_score, k: int, threshold=0.9, factor=1.0,
                gamma=0.35, unmask_prob=1.0):
  """Which masked positions to commit this step (bool ``[b, B]``), docs/algorithms.md §4.2–4.3.

  ``masked`` bool ``[b, B]``: the positions that may be committed; ``conf``/``entropy`` float ``[b, B]``: the chosen
  token's probability and the entropy of each position's processed distribution; ``rand_score`` ``U[0, 1)`` per
  position (random order for ``first_hitting``, Bernoulli draws for ``ddpm_cache``). Every rule but ``ddpm_cache``
  commits at least one position per row that has a mask; none ever commits a position outside ``masked``.
  """
  n_masked = masked.sum(-1, keepdims=True)
  if strategy == "first_hitting":  # uniformly random masked positions, k per step (k = 1: BD3 first hitting)
    rank, _ = _ranks(rand_score, masked)
    return masked & (rank < k)
  if strategy == "ddpm_cache":  # each masked position unmasks independently w.p. (t - s) / t
    return masked & (rand_score < unmask_prob)
  if strategy == "topk_confidence":  # LLaDA low_confidence / SDAR static
    rank, _ = _ranks(conf, masked)
    return masked & (rank < k)
  if strategy == "threshold":  # Fast-dLLM: {argmax c} ∪ {c >= τ}
    rank, _ = _ranks(conf, masked)
    return masked & ((rank == 0) | (conf >= threshold))
  if strategy == "dynamic":  # SDAR low_confidence_dynamic: {c > τ} if there are >= k of them, else top-k
    rank, _ = _ranks(conf, masked)
    above = masked & (conf > threshold)
    return jnp.where(above.sum(-1, keepdims=True) >= k, above, masked & (rank < k))
  if strategy == "factor":  # Fast-dLLM factor: largest n with c_(i) >= 1 - f/(i+1) for all i <= n (1-based)
    rank, c_sorted = _ranks(conf, masked)
    i = jnp.arange(1, masked.shape[-1] + 1, dtype=jnp.float32)
    ok = (c_sorted >= 1.0 - factor / (i + 1.0)) & (i <= n_masked)
    n = jnp.maximum(jnp.cumprod(ok.astype(jnp.int32), axis=-1).sum(-1, keepdims=True), 1)
    return masked & (rank < n)
  if strategy == "entropy_bounded":  # EB-sampler: lowest-entropy prefix with sum(H) <= γ, at least 1
    rank, neg_h_sorted = _ranks(-entropy, masked)
    cum = jnp.cumsum(jnp.where(jnp.isfinite(neg_h_sorted), -neg_h_sorted, jnp.inf), axis=-1)
    n = jnp.maximum((cum <= gamma).sum(-1, keepdims=True), 1)
    return masked & (rank < n)
  raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")


def first_sub_block(masked, sub_block_size: int):
  """Fast-dLLM v2 sub-blocks: only the leftmost sub-block that still has masks may commit (bool ``[b, B]``)."""
  pos = jnp.arange(masked.shape[-1])
  first = jnp.min(jnp.where(masked, pos, masked.shape[-1]), axis=-1, keepdims=True)
  return masked & (pos // sub_block_size == first // sub_block_size)


def semantic_prefix(masked, tokens, conf, delimiters: tuple, threshold: float):
  """AdaBlock-style adaptive block end (AdaBlock-dLLM, 2025; adapted to a model trained on fixed blocks): when a
  masked position's sampled token is a delimiter (``delimiters``: token ids, e.g. newline and sentence ends) with
  confidence ``>= threshold``, the block's commits this step stop at the first such position (inclusive); the
  positions after it wait until the delimiter is committed and they can condition on it. Without a confident
  delimiter nothing is restricted. The leftmost masked position always stays allowed (every rule still commits).
  bool ``[b, B]``. Not exact (no commit rule is): its quality effect is measured, not assumed.
  """
  pos = jnp.arange(masked.shape[-1])
  is_delim = jnp.isin(tokens, jnp.asarray(delimiters, jnp.int32))
  bound = masked & is_delim & (conf >= threshold)
  first = jnp.min(jnp.where(bound, pos, masked.shape[-1]), axis=-1, keepdims=True)
  return masked & (pos <= first)


def shift_logits(block_logits, last_logits):
  """Token shift: position i is predicted by row i-1; position 0 by the clean prefix's last row.

  ``block_logits [b, B, V]``, ``last_logits [b, V]`` -> ``[b, B, V]``.
  """
  return jnp.concatenate([last_logits[:, None], block_logits[:, :-1]], axis=1)


def token_scores(processed, tokens):
  """``(conf, entropy)`` float32 ``[b, B]`` of the chosen ``tokens [b, B]`` under ``processed [b, B, V]`` logits.

  ``conf`` is the chosen token's probability; ``entropy`` skips zero-probability entries (filtered vocabulary,
  [MASK]), whose ``p log p`` is 0, not NaN.
  """
  logp = jax.nn.log_softmax(processed, axis=-1)
  conf = jnp.exp(jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0])
  probs = jnp.exp(logp)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), axis=-1)
  return conf, entropy
