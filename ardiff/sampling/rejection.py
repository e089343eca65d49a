"""The speculative acceptance rule shared by speculative decoding and TiDAR (arXiv 2211.17192, 2302.01318).

Drafts ``d_1..d_k`` were drawn from ``q_1..q_k``; the target gives ``p_1..p_{k+1}``. ``d_i`` is accepted w.p.
``min(1, p_i(d_i) / q_i(d_i))`` until the first rejection. With ``n`` drafts accepted the next token is

* ``n < k`` (``d_{n+1}`` rejected): a correction from ``norm(max(0, p_{n+1} - q_{n+1}))``;
* ``n == k`` (all accepted): a bonus token from ``p_{k+1}`` itself (there is no ``q_{k+1}``).

Then every emitted token follows ``p`` exactly (lossless). The bonus must come from ``p`` and not from a residual
against a padded "q" row: a row of finite ``NEG_INF`` logits softmaxes to the UNIFORM ``1/V``, and
``norm(max(0, p - 1/V))`` never emits a token with ``p < 1/V``.

``accept_rule`` exists for negative-control tests: ``"exact"`` (default) is the lossless rule; ``"always_accept"``
accepts every draft (emits the drafter's distribution); ``"resample_p"`` uses the right acceptance test but draws
the correction from ``p`` instead of the residual (a classic, subtler bug). Both wrong rules are biased.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ardiff.sampling import common

ACCEPT_RULES = ("exact", "always_accept", "resample_p")


def check_accept_rule(accept_rule: str) -> None:
  if accept_rule not in ACCEPT_RULES:
    raise ValueError(f"accept_rule must be one of {ACCEPT_RULES}, got {accept_rule!r}.")


def residual(p_probs: jax.Array, q_probs: jax.Array) -> jax.Array:
  """``norm(max(0, p - q))`` as unnormalised probabilities ``[..., V]``.

  When ``p == q`` up to rounding a rejection has probability ~0 and leaves no residual mass; the (never or almost
  never used) result then falls back to ``p`` so that the draw stays a valid token of ``p``'s support.
  """
  resid = jnp.maximum(p_probs - q_probs, 0.0)
  return jnp.where(jnp.sum(resid, axis=-1, keepdims=True) > 1e-12, resid, p_probs)


def verify(rng, p_logits, q_logits, drafts, *, greedy: bool, accept_rule: str = "exact"):
  """The speculative acceptance rule, vectorised over rows.

  ``p_logits [b, k+1, V]``: processed target logits (``p_i`` scores ``d_i``; ``p_{k+1}`` is the bonus);
  ``q_logits [b, k, V]``: processed logits the drafts were sampled from (entries removed by top-k/top-p/[MASK] hold
  ``NEG_INF`` or ``-inf``: probability 0); ``drafts [b, k]`` int.
  Returns ``(n_accepted [b] in 0..k, next_token [b])``: the correction (``n < k``) or the bonus (``n == k``).
  Greedy: accept while ``argmax p_i == d_i``; the next token is ``argmax p_{n+1}``.
  """
  check_accept_rule(accept_rule)
  b, k = drafts.shape
  if p_logits.shape[:2] != (b, k + 1) or q_logits.shape[:2] != (b, k):
    raise ValueError(f"verify needs p_logits [b, k+1, V] and q_logits [b, k, V] for drafts [b, k]={drafts.shape}; "
                     f"got {p_logits.shape} and {q_logits.shape}.")
  rng_u, rng_y = jax.random.split(rng)
  if greedy:
    ok = jnp.argmax(p_logits[:, :k], axis=-1) == drafts
  else:
    logp = jax.nn.log_softmax(p_logits[:, :k], axis=-1)
    logq = jax.nn.log_softmax(q_logits, axis=-1)
    lp = jnp.take_along_axis(logp, drafts[..., None], axis=-1)[..., 0]
    lq = jnp.take_along_axis(logq, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(rng_u, (b, k), jnp.float32)
    ok = u < jnp.exp(jnp.minimum(lp - lq, 0.0))
  if accept_rule == "always_accept":
    ok = jnp.ones_like(ok)
  n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)
  p_n = jnp.take_along_axis(p_logits, n[:, None, None], axis=1)[:, 0]  # [b, V]: p_{n+1} (0-based row n)
  if greedy:
    return n, jnp.argmax(p_n, axis=-1).astype(jnp.int32)
  q_n = jnp.take_along_axis(q_logits, jnp.minimum(n, k - 1)[:, None, None], axis=1)[:, 0]  # junk where n == k
  pp, qq = jax.nn.softmax(p_n, axis=-1), jax.nn.softmax(q_n, axis=-1)
  corr = pp if accept_rule == "resample_p" else residual(pp, qq)
  probs = jnp.where((n == k)[:, None], pp, corr)  # all accepted: the bonus comes from p itself
  logits = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf)
  y = jnp.argmax(logits + common.gumbel(rng_y, logits.shape), axis=-1).astype(jnp.int32)
  return n, y
