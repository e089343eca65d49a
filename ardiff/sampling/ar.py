"""Autoregressive sampling with an exact KV cache (ragged, right-padded prompts)."""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ardiff import masks as masks_lib
from ardiff.sampling import common
from ardiff.sampling.common import prefill  # noqa: F401  (re-exported: ardiff.sampling.ar.prefill stays importable)


class ARResult(NamedTuple):
  tokens: jax.Array  # int32 [b, max_new]; pad_id after a row's EOS
  lengths: jax.Array  # int32 [b] generated tokens per row (EOS included)
  done: jax.Array  # bool [b] row emitted EOS
  nfe: jax.Array  # int32 scalar: forwards run (prefill counts as 1)
  step_logits: Optional[jax.Array]  # f32 [max_new, b, V] raw logits each token was sampled from (if requested)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "top_p", "greedy", "eos_id", "pad_id",
                                             "return_logits"))
def _sample_ar(params, prompt, prompt_lengths, rng, temperature, *, top_p, model, max_new_tokens, top_k, greedy,
               eos_id, pad_id, return_logits):
  cfg = model.config
  b, p = prompt.shape
  vocab = cfg.vocab_size
  mask = masks_lib.Causal()
  # The last sampled token is never written, so the cache needs P + max_new - 1 slots (one spare).
  cache, logits0 = common.prefill(params, model, prompt, prompt_lengths, p + max_new_tokens, mask)

  def sample(key, logits):
    tok, _ = common.sample_tokens(key, logits, mask_token_id=cfg.mask_token_id, temperature=temperature,
                                  top_k=top_k, top_p=top_p, greedy=greedy)
    return tok

  def emit(i, tok, logits, state):
    tokens, done, lengths, trace = state[:4]
    tok = jnp.where(done, pad_id, tok)
    tokens = tokens.at[:, i].set(tok)
    lengths = lengths + (~done).astype(jnp.int32)
    if eos_id is not None:
      done = done | (tok == eos_id)
    if return_logits:
      trace = trace.at[i].set(logits)
    return tokens, done, lengths, trace

  rng, key = jax.random.split(rng)
  tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  trace = jnp.zeros((max_new_tokens, b, vocab) if return_logits else (0,), jnp.float32)
  tokens, done, lengths, trace = emit(0, sample(key, logits0), logits0,
                                      (tokens, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), trace))

  def cond(state):
    i, _, _, done, *_ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, rng, cache, done, tokens, lengths, trace, nfe = state
    last_token = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)
    out = model.apply({"params": params}, last_token, mask=mask, cache=cache)
    cache = out.cache.advance(1)
    logits = out.logits[:, 0]
    rng, key = jax.random.split(rng)
    tokens, done, lengths, trace = emit(i, sample(key, logits), logits, (tokens, done, lengths, trace))
    return i + 1, rng, cache, done, tokens, lengths, trace, nfe + 1

  state = (jnp.int32(1), rng, cache, done, tokens, lengths, trace, jnp.int32(1))
  _, _, _, done, tokens, lengths, trace, nfe = jax.lax.while_loop(cond, body, state)
  return ARResult(tokens, lengths, done, nfe, trace if return_logits else None)


def sample_ar(params, model, prompt, prompt_lengths, *, rng, max_new_tokens: int, temperature=1.0, top_k: int = 0,
              top_p=1.0, greedy: bool = False, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
              padding_side: str = "right", return_logits: bool = False) -> ARResult:
  """Sample ``max_new_tokens`` per row after ``prompt [b, P]`` with ``prompt_lengths [b]`` (each in [1, P];
  padding on ``padding_side``, 'right' or 'left').

  Rows stop independently at ``eos_id`` (later slots hold ``pad_id``, default ``eos_id`` or 0); the loop exits
  early once every row is done. ``temperature == 0`` means greedy. ``nfe`` counts model forwards.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  common.check_decoding_args(model.config, top_k=top_k, top_p=top_p, eos_id=eos_id)
  greedy, temperature, pad_id = common.decoding_defaults(temperature, greedy, pad_id, eos_id)
  prompt, prompt_lengths = common.right_padded(prompt, prompt_lengths, padding_side)
  return _sample_ar(params, prompt, prompt_lengths, rng,
                    temperature, top_p=float(top_p), model=model,
                    max_new_tokens=int(max_new_tokens), top_k=int(top_k), greedy=greedy, eos_id=eos_id,
                    pad_id=pad_id, return_logits=bool(return_logits))
