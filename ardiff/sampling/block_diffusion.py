"""Block-diffusion sampling over a block-causal model with an exact KV cache (anchors §4 A, E, G; §5).

Per block: start all-[MASK]; each denoising step forwards the B block tokens against the committed cache
(read-only: the block's K/V slots are overwritten by the next step and ``lengths`` is not advanced), commits some
masked positions by the strategy, and when the block is clean one more forward writes its K/V and ``advance(B)``.
Logits are aligned at the same position (position i predicts token i; MDLM/BD3 convention).

Exactness needs block-aligned absolute positions: every row's prompt length must be a multiple of B (validated).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ardiff import masks as masks_lib
from ardiff.sampling import common
from ardiff.sampling.ar import prefill

STRATEGIES = ("first_hitting", "topk_confidence", "threshold", "factor", "entropy_bounded")


class BlockDiffusionResult(NamedTuple):
  tokens: jax.Array  # int32 [b, num_blocks*B]; pad_id after a row's first EOS
  raw_blocks: jax.Array  # int32 [b, num_blocks*B] what was actually fed/cached (no EOS post-processing)
  lengths: jax.Array  # int32 [b] generated tokens up to and including EOS
  done: jax.Array  # bool [b]
  nfe: jax.Array  # int32: forwards run (prefill 1 + denoising steps + one cache write per block)
  steps_per_block_used: jax.Array  # int32 [num_blocks] denoising forwards per block (0 for skipped blocks)
  trace: Optional[dict]  # if requested: per denoising step 'block' [S], 'inputs' [S,b,B], 'logits' [S,b,B,V]


def _ranks(score, valid):
  """Rank (0 = best = highest score) among ``valid`` entries along the last axis; invalid ones rank last."""
  s = jnp.where(valid, score, -jnp.inf)
  order = jnp.argsort(-s, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True), jnp.take_along_axis(s, order, axis=-1)


def commit_mask(strategy: str, *, masked, conf, entropy, rand_score, k: int, threshold=0.9, factor=1.0,
                gamma=0.35):
  """Which masked positions to commit this step (bool [b, B]); always >= 1 per row with any mask (anchors §4E)."""
  n_masked = masked.sum(-1, keepdims=True)
  if strategy == "first_hitting":  # uniformly random masked positions, k per step (k = 1: BD3 first hitting)
    rank, _ = _ranks(rand_score, masked)
    return masked & (rank < k)
  if strategy == "topk_confidence":  # LLaDA low_confidence / SDAR static
    rank, _ = _ranks(conf, masked)
    return masked & (rank < k)
  if strategy == "threshold":  # Fast-dLLM: {argmax c} ∪ {c >= τ}
    rank, _ = _ranks(conf, masked)
    return masked & ((rank == 0) | (conf >= threshold))
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


@functools.partial(jax.jit, static_argnames=(
    "model", "block_size", "num_blocks", "strategy", "k", "top_k", "top_p", "greedy", "eos_id", "pad_id",
    "return_trace"))
def _sample_bd(params, prompt, prompt_lengths, rng, temperature, threshold, factor, gamma, *, model, block_size,
               num_blocks, strategy, k, top_k, top_p, greedy, eos_id, pad_id, return_trace):
  cfg = model.config
  mask_id = cfg.mask_token_id
  b, p = prompt.shape
  bs, vocab = block_size, cfg.vocab_size
  mask = masks_lib.BlockCausal(bs)
  cache, _ = prefill(params, model, prompt, prompt_lengths, p + num_blocks * bs, mask)
  max_steps = num_blocks * bs
  trace0 = dict(block=jnp.full((max_steps if return_trace else 0,), -1, jnp.int32),
                inputs=jnp.zeros((max_steps, b, bs) if return_trace else (0,), jnp.int32),
                logits=jnp.zeros((max_steps, b, bs, vocab) if return_trace else (0,), jnp.float32))

  def denoise_step(cache, state):
    step, rng, xb, nfe, tstep, trace, blk = state
    out = model.apply({"params": params}, xb, mask=mask, cache=cache)  # read-only: out.cache is dropped
    logits = out.logits
    rng, k_tok, k_pos = jax.random.split(rng, 3)
    tok, processed = common.sample_tokens(k_tok, logits, mask_token_id=mask_id, temperature=temperature,
                                          top_k=top_k, top_p=top_p, greedy=greedy)
    logp = jax.nn.log_softmax(processed, axis=-1)
    conf = jnp.exp(jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0])
    probs = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), axis=-1)
    masked = xb == mask_id
    sel = commit_mask(strategy, masked=masked, conf=conf, entropy=entropy,
                      rand_score=jax.random.uniform(k_pos, masked.shape), k=k, threshold=threshold,
                      factor=factor, gamma=gamma)
    if return_trace:
      trace = dict(block=trace["block"].at[tstep].set(blk), inputs=trace["inputs"].at[tstep].set(xb),
                   logits=trace["logits"].at[tstep].set(logits))
    xb = jnp.where(sel, tok, xb)
    return step + 1, rng, xb, nfe + 1, tstep + 1, trace, blk

  def block_body(state):
    n, rng, cache, done, out_tokens, nfe, tstep, trace, steps_used = state
    xb = jnp.where(done[:, None], pad_id, jnp.full((b, bs), mask_id, jnp.int32))
    inner = (jnp.int32(0), rng, xb, nfe, tstep, trace, n)
    step, rng, xb, nfe, tstep, trace, _ = jax.lax.while_loop(
        lambda s: jnp.any(s[2] == mask_id) & (s[0] < bs), functools.partial(denoise_step, cache), inner)
    xb = jnp.where(xb == mask_id, pad_id, xb)  # unreachable (>= 1 commit per step); keeps outputs mask-free
    out_tokens = jax.lax.dynamic_update_slice_in_dim(out_tokens, xb, n * bs, axis=1)
    # Write the clean block's K/V and commit it.
    cache = model.apply({"params": params}, xb, mask=mask, cache=cache).cache.advance(bs)
    if eos_id is not None:
      done = done | jnp.any(xb == eos_id, axis=-1)
    return n + 1, rng, cache, done, out_tokens, nfe + 1, tstep, trace, steps_used.at[n].set(step)

  state = (jnp.int32(0), rng, cache, jnp.zeros((b,), bool), jnp.full((b, num_blocks * bs), pad_id, jnp.int32),
           jnp.int32(1), jnp.int32(0), trace0, jnp.zeros((num_blocks,), jnp.int32))
  _, _, _, done, raw, nfe, _, trace, steps_used = jax.lax.while_loop(
      lambda s: (s[0] < num_blocks) & ~jnp.all(s[3]), block_body, state)

  idx = jnp.arange(raw.shape[1])
  if eos_id is not None:
    is_eos = raw == eos_id
    first = jnp.where(jnp.any(is_eos, -1), jnp.argmax(is_eos, -1), raw.shape[1])
    tokens = jnp.where(idx[None] > first[:, None], pad_id, raw)
    lengths = jnp.minimum(first + 1, raw.shape[1]).astype(jnp.int32)
  else:
    tokens, lengths = raw, jnp.full((b,), raw.shape[1], jnp.int32)
  return BlockDiffusionResult(tokens, raw, lengths, done, nfe, steps_used, trace if return_trace else None)


def sample_block_diffusion(params, model, prompt, prompt_lengths, *, rng, block_size: int, num_blocks: int,
                           strategy: str = "topk_confidence", steps_per_block: Optional[int] = None,
                           threshold: float = 0.9, factor: float = 1.0, gamma: float = 0.35, temperature=0.0,
                           top_k: int = 0, top_p: float = 1.0, greedy: bool = False, eos_id: Optional[int] = None,
                           pad_id: Optional[int] = None, return_trace: bool = False) -> BlockDiffusionResult:
  """Generate ``num_blocks`` blocks of ``block_size`` after a right-padded ``prompt [b, P]``.

  ``prompt_lengths`` (concrete, each a positive multiple of ``block_size``) are validated on the host.
  ``steps_per_block`` sets the static ``k = ceil(B / steps)`` of ``first_hitting``/``topk_confidence`` (default B
  steps, k = 1). ``threshold`` (τ), ``factor`` (f) and ``gamma`` (γ) parameterize the dynamic rules.
  ``temperature == 0`` (default) or ``greedy`` decodes with argmax; confidences are always probabilities of the
  chosen token under the processed (temperature/top-k/top-p, [MASK]-free) distribution.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
  if model.config.mask_token_id is None:
    raise ValueError("block diffusion needs model.config.mask_token_id.")
  lens = np.asarray(prompt_lengths)
  if lens.ndim != 1 or np.any(lens < block_size) or np.any(lens % block_size) or np.any(lens > prompt.shape[1]):
    raise ValueError(f"prompt_lengths {lens.tolist()} must be positive multiples of block_size={block_size} "
                     f"and <= the padded prompt length {prompt.shape[1]} (block-aligned positions keep the "
                     "cached sampler exact).")
  steps = block_size if steps_per_block is None else int(steps_per_block)
  if not 1 <= steps <= block_size:
    raise ValueError(f"steps_per_block must be in [1, {block_size}], got {steps}.")
  k = -(-block_size // steps)
  if pad_id is None:
    pad_id = eos_id if eos_id is not None else 0
  if isinstance(temperature, (int, float)) and temperature == 0:
    greedy = True
  return _sample_bd(params, jnp.asarray(prompt, jnp.int32), jnp.asarray(lens, jnp.int32), rng,
                    jnp.float32(1.0 if greedy else temperature), jnp.float32(threshold), jnp.float32(factor),
                    jnp.float32(gamma), model=model, block_size=int(block_size), num_blocks=int(num_blocks),
                    strategy=strategy, k=k, top_k=int(top_k), top_p=float(top_p), greedy=bool(greedy),
                    eos_id=eos_id, pad_id=int(pad_id), return_trace=bool(return_trace))


def reference_block_logits(params, model, prompt, prompt_lengths, result: BlockDiffusionResult, block_size: int):
  """Exactness helper: uncached logits for every traced denoising step, ``[S, b, B, V]`` (NaN for unused steps).

  For step s in block n, row r's sequence is ``[prompt_r, raw_blocks_r[:n*B], inputs[s, r]]`` (positions from 0),
  forwarded without a cache under ``BlockCausal(B)``; trailing padding cannot affect it (block-causal).
  """
  prompt = np.asarray(prompt)
  lens = np.asarray(prompt_lengths)
  tr = {key: np.asarray(v) for key, v in result.trace.items()}
  raw = np.asarray(result.raw_blocks)
  s_total, b, bs = tr["inputs"].shape
  length = prompt.shape[1] + raw.shape[1]
  seqs = np.zeros((s_total, b, length), np.int32)
  starts = np.zeros((s_total, b), np.int32)
  for s in range(s_total):
    n = tr["block"][s]
    if n < 0:
      continue
    for r in range(b):
      row = np.concatenate([prompt[r, :lens[r]], raw[r, :n * bs], tr["inputs"][s, r]])
      seqs[s, r, :len(row)] = row
      starts[s, r] = lens[r] + n * bs
  fwd = jax.jit(lambda t: model.apply({"params": params}, t, mask=masks_lib.BlockCausal(bs)).logits)
  logits = np.asarray(fwd(jnp.asarray(seqs.reshape(s_total * b, length)))).reshape(s_total, b, length, -1)
  out = np.full(tr["logits"].shape, np.nan, np.float32)
  for s in range(s_total):
    if tr["block"][s] < 0:
      continue
    for r in range(b):
      out[s, r] = logits[s, r, starts[s, r]:starts[s, r] + bs]
  return out
