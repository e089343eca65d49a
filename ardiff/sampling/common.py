"""Pieces shared by the samplers: logit processing ([MASK] removal, temperature, top-k, top-p, greedy, float32
Gumbel), argument checks, the prompt prefill, and the per-row output-buffer bookkeeping of the draft+verify samplers.

All functions are pure and jit-safe; ``top_k``/``greedy`` are static Python values, ``temperature``/``top_p`` may be
traced scalars. Gumbel noise is drawn in float32 log space (``-log(-log u)``, ``u`` clipped away from 0 and 1); see
docs/algorithms.md §4.1 (LLaDA uses float64, which TPUs lack).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ardiff import masks as masks_lib
from ardiff.model import KVCache
from kernels_pallas.common import NEG_INF  # the one finite "minus infinity": no NaN when a whole row is masked


def remove_mask_logit(logits: jax.Array, mask_token_id: Optional[int]) -> jax.Array:
  logits = logits.astype(jnp.float32)
  if mask_token_id is not None:
    logits = logits.at[..., mask_token_id].set(NEG_INF)
  return logits


def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
  """Keep the ``top_k`` largest logits (static int; 0 disables)."""
  if not top_k or top_k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
  return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits: jax.Array, top_p) -> jax.Array:
  """Nucleus filter: keep the smallest prefix (by probability) whose mass reaches ``top_p``; top-1 always kept."""
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  cum_before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted entry
  # top_p >= 1 keeps everything: a float32 cumsum can reach 1.0 before the tail (whose entries would then be cut).
  keep_sorted = (cum_before < top_p) | (jnp.asarray(top_p) >= 1.0)
  keep_sorted = keep_sorted.at[..., 0].set(True)
  cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, NEG_INF, logits)


def process_logits(logits: jax.Array, *, mask_token_id: Optional[int] = None, temperature=1.0, top_k: int = 0,
                   top_p=1.0) -> jax.Array:
  """float32 logits scaled by 1/temperature, [MASK] removed, then top-k and top-p filtered.

  [MASK] is removed AFTER the scaling so that its ``NEG_INF`` stays ``NEG_INF`` at any temperature (``NEG_INF / T``
  with a huge ``T`` would give [MASK] probability mass again).
  """
  logits = logits.astype(jnp.float32) / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
  logits = remove_mask_logit(logits, mask_token_id)
  logits = top_k_filter(logits, top_k)
  if not (isinstance(top_p, (int, float)) and top_p >= 1.0):
    logits = top_p_filter(logits, top_p)
  return logits


def gumbel(rng: jax.Array, shape) -> jax.Array:
  """float32 Gumbel(0, 1) noise, ``u`` clipped to (tiny, 1 - eps)."""
  u = jax.random.uniform(rng, shape, jnp.float32)
  u = jnp.clip(u, jnp.finfo(jnp.float32).tiny, 1.0 - jnp.finfo(jnp.float32).eps)
  return -jnp.log(-jnp.log(u))


def sample_from_logits(rng: jax.Array, logits: jax.Array, *, greedy: bool) -> jax.Array:
  """Gumbel-max sample (or argmax when ``greedy``) of already-processed logits; int32 ``[...]``."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jnp.argmax(logits + gumbel(rng, logits.shape), axis=-1).astype(jnp.int32)


def sample_tokens(rng, logits, *, mask_token_id=None, temperature=1.0, top_k=0, top_p=1.0, greedy=False):
  """Process raw logits and sample; ``greedy`` or a static ``temperature == 0`` gives argmax."""
  if isinstance(temperature, (int, float)) and temperature == 0:
    greedy = True
  processed = process_logits(logits, mask_token_id=mask_token_id, temperature=1.0 if greedy else temperature,
                             top_k=top_k, top_p=top_p)
  return sample_from_logits(rng, processed, greedy=greedy), processed


def right_padded(prompt, prompt_lengths, padding_side: str = "right"):
  """Validated host-side ``(int32 prompt [b, P], int32 lengths [b])`` with each row's tokens first.

  The samplers work on right-padded rows (each row's cache fills from slot 0); left-padded batches, as most
  tokenizers produce them for generation, are rolled into that layout here.
  """
  prompt = np.asarray(prompt)
  lengths = np.asarray(prompt_lengths)
  if prompt.ndim != 2:
    raise ValueError(f"prompt must be [batch, length], got shape {prompt.shape}.")
  if lengths.shape != (prompt.shape[0],):
    raise ValueError(f"prompt_lengths must be [batch]={prompt.shape[0]}, got shape {lengths.shape}.")
  if np.any(lengths < 1) or np.any(lengths > prompt.shape[1]):
    raise ValueError(f"prompt_lengths {lengths.tolist()} must lie in [1, {prompt.shape[1]}] (every row needs at "
                     "least one prompt token, e.g. BOS).")
  if padding_side == "left":
    prompt = np.stack([np.roll(row, n - prompt.shape[1]) for row, n in zip(prompt, lengths)])
  elif padding_side != "right":
    raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
  return jnp.asarray(prompt, jnp.int32), jnp.asarray(lengths, jnp.int32)


def check_decoding_args(config, *, top_k: int, top_p: float, eos_id: Optional[int]) -> None:
  """Host-side checks of the filters and EOS id of a sampler call for a model ``config`` (ValueError naming the value
  and the fix)."""
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {top_k}.")
  if not 0.0 < float(top_p) <= 1.0:  # NaN fails too
    raise ValueError(f"top_p must lie in (0, 1] (1 keeps every token), got {top_p}.")
  if eos_id is not None:
    if not 0 <= eos_id < config.vocab_size:
      raise ValueError(f"eos_id={eos_id} must lie in [0, vocab_size={config.vocab_size}).")
    if eos_id == config.mask_token_id:
      raise ValueError(f"eos_id={eos_id} is the [MASK] id, which is never sampled, so no row would ever stop; "
                       "pass the tokenizer's EOS id.")


def decoding_defaults(temperature, greedy: bool, pad_id: Optional[int], eos_id: Optional[int]):
  """``(greedy, temperature as float32, pad_id)`` shared by the samplers' entry points: a (static) temperature
  of 0 means greedy, and finished rows are padded with EOS (or 0 without an EOS). A static temperature must be a
  number >= 0 (a traced one is not checked)."""
  if isinstance(temperature, (int, float, np.floating, np.integer)) and not temperature >= 0:  # NaN fails too
    raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}.")
  if isinstance(temperature, (int, float)) and temperature == 0:
    greedy = True
  if pad_id is None:
    pad_id = eos_id if eos_id is not None else 0
  return bool(greedy), jnp.float32(1.0 if greedy else temperature), int(pad_id)


def prefill(params, model, prompt_tokens, prompt_lengths, max_len: int, mask: masks_lib.Mask):
  """Write the (right-padded) prompt's K/V; returns ``(cache with lengths = prompt_lengths, last_logits [b, V])``.

  Padded K/V past a row's length is never read: later writes start at ``lengths[b]`` and overwrite it, and the
  attention masks keys ``>= lengths[b] + T``. ``mask`` must not let a valid prompt token see later positions
  (Causal, or BlockCausal with block-aligned prompt lengths). Rows need ``prompt_lengths >= 1`` for the logits.
  """
  b, p = prompt_tokens.shape
  if max_len < p:
    raise ValueError(f"max_len={max_len} < padded prompt length {p}.")
  cache = KVCache.init(model.config, b, max_len)
  out = model.apply({"params": params}, prompt_tokens, mask=mask, cache=cache)
  prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
  last = jnp.take_along_axis(out.logits, jnp.maximum(prompt_lengths - 1, 0)[:, None, None], axis=1)[:, 0]
  return out.cache.rewind_to(prompt_lengths), last


# Row bookkeeping of the draft+verify samplers: each row appends a variable number of tokens per step into a
# ``[b, max_new + spill]`` buffer at its own offset ``n_out[b]``.


def write_rows(buf, vals, start, active):
  """``buf[b, start[b]:start[b]+T] = vals[b]`` where ``active[b]`` (start + T must fit: no clamping)."""
  new = jax.vmap(lambda r, v, s: jax.lax.dynamic_update_slice(r, v, (s,)))(buf, vals, start)
  return jnp.where(active[:, None], new, buf)


def finalize(buf, n_out, max_new, eos_id, pad_id):
  """Trim the spill buffer to ``max_new``; cut after each row's first EOS. Returns ``(tokens, lengths, done)``."""
  tokens = buf[:, :max_new]
  idx = jnp.arange(max_new)
  valid = idx[None] < jnp.minimum(n_out, max_new)[:, None]
  if eos_id is not None:
    is_eos = (tokens == eos_id) & valid
    done = jnp.any(is_eos, -1)
    first = jnp.where(done, jnp.argmax(is_eos, -1), max_new)
    valid = valid & (idx[None] <= first[:, None])
  else:
    done = jnp.zeros((buf.shape[0],), bool)
  tokens = jnp.where(valid, tokens, pad_id)
  return tokens, jnp.sum(valid, -1).astype(jnp.int32), done


def row_done(buf, n_out, max_new, eos_id):
  """A row stops when it has ``max_new`` tokens or emitted EOS among them."""
  full = n_out >= max_new
  if eos_id is None:
    return full
  idx = jnp.arange(buf.shape[1])
  return full | jnp.any((buf == eos_id) & (idx[None] < n_out[:, None]), -1)
