"""Speculative decoding with a separate AR drafter (docs/algorithms.md §5.1; arXiv 2211.17192, 2302.01318).

Each step the drafter proposes ``k`` tokens ``d_i ~ q_i`` (its *processed* distribution: [MASK] removed, the same
temperature / top-k / top-p as the target), then ONE cached target forward over ``[y, d_1..d_k]`` (``y`` = the last
emitted token, not yet in either cache) gives ``p_1..p_{k+1}``. Draft ``d_i`` is accepted w.p. ``min(1, p_i/q_i)``;
at the first rejection a correction is drawn from ``norm(max(0, p_i - q_i))``; if all ``k`` are accepted a bonus
token is drawn from ``p_{k+1}`` itself (:func:`ardiff.sampling.rejection.verify`). Both caches are then rewound to
the accepted prefix (``KVCache.rewind_to``), per row.
The emitted sequence is distributed exactly as AR sampling from the target's processed distribution (lossless);
greedy mode accepts while ``argmax p_i == d_i`` and equals greedy AR token for token.

Static shapes throughout: the step is a ``lax.while_loop`` over a ``[batch]`` of rows with per-row accept counts.
The drafter's cache lags the target's by one token after a fully accepted step (``d_k`` was never fed to it); the
next step's first drafter forward feeds two tokens ``[d_k, y]`` for those rows (one token for the others), so the
drafter costs exactly ``k`` forwards per step.

``accept_rule`` (negative controls for tests) is documented in :mod:`ardiff.sampling.rejection`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ardiff import masks as masks_lib
from ardiff.sampling import common
from ardiff.sampling.common import finalize, prefill, row_done, write_rows
from ardiff.sampling.rejection import ACCEPT_RULES, check_accept_rule, verify  # noqa: F401  (re-exported)


class SpeculativeResult(NamedTuple):
  tokens: jax.Array  # int32 [b, max_new]; pad_id after a row's EOS
  lengths: jax.Array  # int32 [b] generated tokens per row (EOS included)
  done: jax.Array  # bool [b] row emitted EOS
  nfe: jax.Array  # int32: target forwards (prefill counts as 1)
  draft_nfe: jax.Array  # int32: drafter forwards (prefill counts as 1)
  steps: jax.Array  # int32: draft+verify steps run
  accepted: jax.Array  # int32 [b]: accepted drafts per row


@functools.partial(jax.jit, static_argnames=("model", "draft_model", "num_draft", "max_new_tokens", "top_k", "top_p",
                                             "greedy", "eos_id", "pad_id", "accept_rule"))
def _sample_spec(params, draft_params, prompt, prompt_lengths, rng, temperature, *, model, draft_model, num_draft,
                 max_new_tokens, top_k, top_p, greedy, eos_id, pad_id, accept_rule):
  cfg = model.config
  b, p = prompt.shape
  k = num_draft
  mask = masks_lib.Causal()
  mask_id = cfg.mask_token_id
  proc = lambda lg: common.process_logits(lg, mask_token_id=mask_id, temperature=temperature, top_k=top_k,
                                          top_p=top_p)
  sample = lambda key, lg: common.sample_from_logits(key, lg, greedy=greedy)

  cap = p + max_new_tokens + 2 * k + 2  # finished rows keep writing (never committing) past their length
  tcache, t_last = prefill(params, model, prompt, prompt_lengths, cap, mask)
  dcache, _ = prefill(draft_params, draft_model, prompt, prompt_lengths, cap, mask)
  rng, key = jax.random.split(rng)
  y = sample(key, proc(t_last))
  buf = jnp.full((b, max_new_tokens + k + 1), pad_id, jnp.int32).at[:, 0].set(y)
  n_out = jnp.ones((b,), jnp.int32)
  rows = jnp.arange(b)

  def draft(dcache, y, dpend, dlast, rng):
    """k drafter forwards; returns drafts [b,k], their processed logits [b,k,V], the advanced drafter cache."""
    two = jnp.where(dpend[:, None], jnp.stack([dlast, y], 1), jnp.stack([y, y], 1))
    out = draft_model.apply({"params": draft_params}, two, mask=mask, cache=dcache)
    ql = proc(out.logits[rows, dpend.astype(jnp.int32)])
    dcache = out.cache.advance(1 + dpend.astype(jnp.int32))
    rng, key = jax.random.split(rng)
    d = sample(key, ql)

    def one(carry, key):
      dcache, d = carry
      out = draft_model.apply({"params": draft_params}, d[:, None], mask=mask, cache=dcache)
      ql = proc(out.logits[:, 0])
      d_next = sample(key, ql)
      return (out.cache.advance(1), d_next), (d_next, ql)

    (dcache, _), (ds, qls) = jax.lax.scan(one, (dcache, d), jax.random.split(rng, k - 1))
    drafts = jnp.concatenate([d[:, None], jnp.moveaxis(ds, 0, 1)], 1)
    q_logits = jnp.concatenate([ql[:, None], jnp.moveaxis(qls, 0, 1)], 1)
    return drafts, q_logits, dcache

  def cond(s):
    return ~jnp.all(row_done(s["buf"], s["n_out"], max_new_tokens, eos_id))

  def body(s):
    active = ~row_done(s["buf"], s["n_out"], max_new_tokens, eos_id)
    rng, k_draft, k_ver = jax.random.split(s["rng"], 3)
    lt = s["tcache"].lengths
    drafts, q_logits, dcache = draft(s["dcache"], s["y"], s["dpend"], s["dlast"], k_draft)
    out = model.apply({"params": params}, jnp.concatenate([s["y"][:, None], drafts], 1), mask=mask,
                      cache=s["tcache"])
    n, y_new = verify(k_ver, proc(out.logits), q_logits, drafts, greedy=greedy, accept_rule=accept_rule)
    idx = jnp.arange(k + 1)[None]
    emitted = jnp.where(idx < n[:, None], jnp.concatenate([drafts, drafts[:, :1]], 1), y_new[:, None])
    buf = write_rows(s["buf"], emitted, s["n_out"], active)
    tcache = out.cache.rewind_to(jnp.where(active, lt + 1 + n, lt))
    all_acc = n == k
    dcache = dcache.rewind_to(jnp.where(active, lt + 1 + jnp.minimum(n, k - 1), s["dcache"].lengths))
    return dict(rng=rng, tcache=tcache, dcache=dcache, buf=buf,
                n_out=jnp.where(active, s["n_out"] + n + 1, s["n_out"]),
                y=jnp.where(active, y_new, s["y"]),
                dpend=jnp.where(active, all_acc, s["dpend"]),
                dlast=jnp.where(active & all_acc, drafts[:, -1], s["dlast"]),
                accepted=s["accepted"] + jnp.where(active, n, 0), steps=s["steps"] + 1)

  s = dict(rng=rng, tcache=tcache, dcache=dcache, buf=buf, n_out=n_out, y=y, dpend=jnp.zeros((b,), bool),
           dlast=jnp.zeros((b,), jnp.int32), accepted=jnp.zeros((b,), jnp.int32), steps=jnp.int32(0))
  s = jax.lax.while_loop(cond, body, s)
  tokens, lengths, done = finalize(s["buf"], s["n_out"], max_new_tokens, eos_id, pad_id)
  return SpeculativeResult(tokens, lengths, done, 1 + s["steps"], 1 + k * s["steps"], s["steps"], s["accepted"])


def sample_speculative(params, model, draft_params, draft_model, prompt, prompt_lengths, *, rng, max_new_tokens: int,
                       num_draft: int = 4, temperature=1.0, top_k: int = 0, top_p=1.0, greedy: bool = False,
                       eos_id: Optional[int] = None, pad_id: Optional[int] = None, padding_side: str = "right",
                       accept_rule: str = "exact") -> SpeculativeResult:
  """Speculative sampling from ``model`` (target) with ``draft_model`` proposing ``num_draft`` tokens per step.

  Same prompt conventions as :func:`ardiff.sampling.ar.sample_ar` (``prompt [b, P]``, ragged ``prompt_lengths``
  in [1, P], ``padding_side``). The samples follow the target's processed distribution exactly
  (``accept_rule="exact"``); ``temperature == 0`` or ``greedy`` gives greedy AR decoding of the target. ``nfe``
  counts target forwards.
  """
  if max_new_tokens < 1 or num_draft < 1:
    raise ValueError(f"max_new_tokens ({max_new_tokens}) and num_draft ({num_draft}) must be >= 1.")
  if draft_model.config.vocab_size != model.config.vocab_size:
    raise ValueError(f"drafter vocab {draft_model.config.vocab_size} != target vocab {model.config.vocab_size}.")
  check_accept_rule(accept_rule)
  common.check_decoding_args(model.config, top_k=top_k, top_p=top_p, eos_id=eos_id)
  prompt, prompt_lengths = common.right_padded(prompt, prompt_lengths, padding_side)
  greedy, temperature, pad_id = common.decoding_defaults(temperature, greedy, pad_id, eos_id)
  return _sample_spec(params, draft_params, prompt, prompt_lengths,
                      rng, temperature, model=model, draft_model=draft_model,
                      num_draft=int(num_draft), max_new_tokens=int(max_new_tokens), top_k=int(top_k),
                      top_p=float(top_p), greedy=greedy, eos_id=eos_id, pad_id=pad_id,
                      accept_rule=accept_rule)
