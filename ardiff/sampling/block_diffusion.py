"""Block-diffusion sampling over a block-causal model with an exact KV cache (anchors §4 A, B, E, G; §5).

Per block: start from [MASK] (the first block keeps the prompt's last, partial block: its prompt tokens are known,
the rest masked); each denoising forward runs the B block tokens against the committed cache, read-only (the
block's K/V slots are overwritten by the next forward and ``lengths`` is not advanced); the strategy commits some
masked positions; when the block is clean its K/V is written and committed (``advance(B)``), either

* ``kv_write="separate"``: by one more forward of the clean block (BD3-LM, SDAR), or
* ``kv_write="fused"``: inside the next block's first denoising forward, over ``[clean block ; next block]``
  (ACDiT's lazy write): the clean rows cannot see the next block under ``BlockCausal``, so their K/V are exactly
  those of a separate forward, and one forward per block is saved.

The last block's K/V is never needed, so it is never written. Every forward sees exactly what an uncached
``BlockCausal(B)`` forward of the whole sequence would (tested: :func:`reference_block_logits`).

Rows progress independently: each forward serves every row at its own block (per-row cache lengths), so a row
that finishes its block early starts the next one instead of waiting for the slowest row of the batch. With fused
writes a forward is ``2B`` wide whenever some row has a clean block to commit (the other rows put their block
first and filler after it, which they never see); otherwise it is ``B`` wide. With one row this is exactly the
block-by-block schedule.

Absolute positions must be block-aligned for the cache to be exact: each row's prompt is split into its whole
blocks (prefilled) and a partial tail that seeds the first generated block, so any prompt length works and ragged
batches stay exact. ``token_shift=True`` is for Dream / Fast-dLLM v2 style models (row ``i-1`` predicts token
``i``): a block's first position is predicted by the last row of the clean prefix, as in training
(:func:`ardiff.objectives.diffusion.diffusion_logits`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ardiff import masks as masks_lib
from ardiff.sampling import common
from ardiff.sampling.ar import prefill

STRATEGIES = ("first_hitting", "ddpm_cache", "topk_confidence", "threshold", "factor", "dynamic",
              "entropy_bounded")
KV_WRITES = ("separate", "fused")


class BlockDiffusionResult(NamedTuple):
  tokens: jax.Array  # int32 [b, num_blocks*B] generated tokens, left-aligned; pad_id after EOS / past the end
  raw_blocks: jax.Array  # int32 [b, num_blocks*B] the blocks as denoised (block 0 starts with the prompt's tail)
  lengths: jax.Array  # int32 [b] generated tokens up to and including EOS
  done: jax.Array  # bool [b] row emitted EOS
  nfe: jax.Array  # int32: batched forwards run (prefill 1 + denoising forwards + separate cache writes)
  steps_per_block_used: jax.Array  # int32 [b, num_blocks] denoising forwards that served each row's block
  trace: Optional[dict]  # if requested, per loop iteration s and row r: 'block' [S, b] (the row's block index,
  #   -1: no fresh logits for it), 'inputs' [S, b, B], 'logits' [S, b, B, V] (raw), 'last' [S, b, V] (the clean
  #   prefix's last logits)


def _ranks(score, valid):
  """Rank (0 = best = highest score) among ``valid`` entries along the last axis; invalid ones rank last."""
  s = jnp.where(valid, score, -jnp.inf)
  order = jnp.argsort(-s, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True), jnp.take_along_axis(s, order, axis=-1)


def commit_mask(strategy: str, *, masked, conf, entropy, rand_score, k: int, threshold=0.9, factor=1.0,
                gamma=0.35, unmask_prob=1.0):
  """Which masked positions to commit this step (bool ``[b, B]``), anchors §4 A, B, E.

  Every rule but ``ddpm_cache`` commits at least one position per row that has a mask. ``rand_score`` is
  ``U[0, 1)`` per position (random order for ``first_hitting``, Bernoulli draws for ``ddpm_cache``).
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


def shift_logits(block_logits, last_logits):
  """Token shift: position i is predicted by row i-1; position 0 by the clean prefix's last row."""
  return jnp.concatenate([last_logits[:, None], block_logits[:, :-1]], axis=1)


@functools.partial(jax.jit, static_argnames=(
    "model", "block_size", "num_blocks", "strategy", "k", "steps", "sub_block_size", "token_shift", "fused_write",
    "top_k", "top_p", "greedy", "eos_id", "pad_id", "return_trace"))
def _sample_bd(params, prompt, prompt_lengths, rng, temperature, threshold, factor, gamma, *, model, block_size,
               num_blocks, strategy, k, steps, sub_block_size, token_shift, fused_write, top_k, top_p, greedy,
               eos_id, pad_id, return_trace):
  mask_id = model.config.mask_token_id
  b, p = prompt.shape
  bs, vocab = block_size, model.config.vocab_size
  mask = masks_lib.BlockCausal(bs)
  fwd = lambda cache, tokens: model.apply({"params": params}, tokens, mask=mask, cache=cache)
  rows = jnp.arange(b)

  # Whole prompt blocks go to the cache; the partial tail seeds block 0. Writes reach at most
  # aligned + (num_blocks + 1) * B (a two-block forward at the last block), inside this capacity.
  aligned = (prompt_lengths // bs) * bs
  tail = prompt_lengths - aligned
  cache, last = prefill(params, model, prompt, aligned, p + (num_blocks + 1) * bs, mask)
  j = jnp.arange(bs)
  is_tail = j[None] < tail[:, None]  # [b, B] block-0 slots that hold prompt tokens
  tail_tokens = jnp.take_along_axis(jnp.pad(prompt, ((0, 0), (0, bs))), aligned[:, None] + j[None], axis=1)
  # Every iteration commits >= 1 token in each active row (ddpm_cache: one of its `steps` time steps) or writes a
  # pending block (<= 1 per block): a static bound for the loop and the trace.
  max_iters = num_blocks * ((steps if strategy == "ddpm_cache" else bs) + 1)
  trace0 = dict(block=jnp.full((max_iters, b) if return_trace else (0,), -1, jnp.int32),
                inputs=jnp.zeros((max_iters, b, bs) if return_trace else (0,), jnp.int32),
                logits=jnp.zeros((max_iters, b, bs, vocab) if return_trace else (0,), jnp.float32),
                last=jnp.zeros((max_iters, b, vocab) if return_trace else (0,), jnp.float32))

  def forward(s):
    """One batched forward, or none when no active row needs fresh logits (ddpm_cache reuse).

    Returns (cache, block logits, last logits, rows whose block logits are fresh, whether a forward ran).
    A pending row is committed here: with fused writes as the first B of 2B tokens ``[clean ; next block]``
    (rows without a pending block put their current block first and filler after it, which their rows never
    see under BlockCausal); with separate writes by this forward of the clean block alone.
    """
    pending, stale = s["pending"] & s["active"], s["stale"] & s["active"]
    cache, last, xb = s["cache"], s["last"], s["xb"]

    def narrow():  # one block per row; commits the pending (clean) blocks of separate writes
      out = fwd(cache, xb)  # writes every row's block at its length; only pending rows commit theirs
      return out.cache.advance(jnp.where(pending, bs, 0)), out.logits, \
          jnp.where(pending[:, None], out.logits[:, -1], last)

    def wide():  # [clean ; next] for pending rows, [current ; filler] for the others
      first = jnp.where(pending[:, None], s["prev"], xb)
      second = jnp.where(pending[:, None], xb, mask_id)
      out = fwd(cache, jnp.concatenate([first, second], axis=1))
      block_logits = jnp.where(pending[:, None, None], out.logits[:, bs:], out.logits[:, :bs])
      return (out.cache.advance(jnp.where(pending, bs, 0)), block_logits,
              jnp.where(pending[:, None], out.logits[:, bs - 1], last))

    def skip():
      return cache, s["logits"], last

    need = jnp.any(stale | pending)
    branches = [skip, narrow] + ([wide] if fused_write else [])
    which = jnp.where(need, jnp.where(jnp.any(pending) & fused_write, 2, 1), 0)
    cache, fresh, last = jax.lax.switch(which, branches)
    # Separate writes: a pending row's forward was its write; its next block has no logits yet.
    served = stale if fused_write else stale & ~pending
    return cache, fresh, last, served & need, need

  def body(s):
    active = s["active"]
    cache, fresh, last, served, ran = forward(s)
    logits = jnp.where(served[:, None, None], fresh, s["logits"])
    n, xb = s["n"], s["xb"]
    if not fused_write:  # the rows whose clean block was just written move on to their next block
      wrote = s["pending"] & active
      n = n + wrote
      xb = jnp.where(wrote[:, None], mask_id, xb)
    forwards = s["forwards"].at[rows, jnp.minimum(n, num_blocks - 1)].add(served.astype(jnp.int32))
    trace = s["trace"]
    if return_trace:
      t = s["it"]
      put = lambda arr, v: arr.at[t].set(jnp.where(served.reshape((-1,) + (1,) * (v.ndim - 1)), v, arr[t]))
      trace = dict(block=put(trace["block"], n), inputs=put(trace["inputs"], xb), logits=put(trace["logits"], logits),
                   last=put(trace["last"], last))

    pred = shift_logits(logits, last) if token_shift else logits
    rng, k_tok, k_pos = jax.random.split(s["rng"], 3)
    tok, processed = common.sample_tokens(k_tok, pred, mask_token_id=mask_id, temperature=temperature,
                                          top_k=top_k, top_p=top_p, greedy=greedy)
    logp = jax.nn.log_softmax(processed, axis=-1)
    conf = jnp.exp(jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0])
    probs = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * logp, 0.0), axis=-1)
    stepping = active & (served | ~s["stale"])  # rows with valid logits for their current block
    masked = (xb == mask_id) & stepping[:, None]
    if sub_block_size:
      masked = first_sub_block(masked, sub_block_size)
    unmask_prob = 1.0 / jnp.maximum(steps - s["i"], 1).astype(jnp.float32)[:, None]
    sel = commit_mask(strategy, masked=masked, conf=conf, entropy=entropy,
                      rand_score=jax.random.uniform(k_pos, masked.shape), k=k, threshold=threshold, factor=factor,
                      gamma=gamma, unmask_prob=unmask_prob)
    xb = jnp.where(sel, tok, xb)
    i = jnp.where(stepping, s["i"] + 1, s["i"])
    stale = jnp.where(stepping, jnp.any(sel, -1), s["stale"] | (active & ~stepping))

    # Rows whose block is now clean: record it, then stop (last block or EOS) or go on to the next block.
    clean = stepping & ~jnp.any(xb == mask_id, axis=-1)
    placed = jax.vmap(lambda row, blk, at: jax.lax.dynamic_update_slice_in_dim(row, blk, at, 0))(
        s["out"], xb, n * bs)
    out_tokens = jnp.where(clean[:, None], placed, s["out"])
    done = s["done"]
    if eos_id is not None:
      done = done | (clean & jnp.any((xb == eos_id) & ~((n == 0)[:, None] & is_tail), axis=-1))
    finished = clean & ((n == num_blocks - 1) | done)
    go_on = clean & ~finished
    pending = jnp.where(clean, go_on, s["pending"] & ~active)  # every active pending block was just written
    if fused_write:  # the clean block waits in `prev`; the next block starts now
      prev = jnp.where(go_on[:, None], xb, s["prev"])
      xb = jnp.where(go_on[:, None], mask_id, xb)
      n = n + go_on
      stale = stale | go_on
    else:  # the clean block stays in `xb` until its write
      prev = s["prev"]
    i = jnp.where(go_on, 0, i)
    return dict(it=s["it"] + 1, rng=rng, cache=cache, n=n, xb=xb, prev=prev, pending=pending, last=last,
                logits=logits, stale=stale, i=i, active=active & ~finished, done=done, out=out_tokens,
                nfe=s["nfe"] + ran, trace=trace, forwards=forwards)

  xb0 = jnp.where(is_tail, tail_tokens, mask_id)
  s = dict(it=jnp.int32(0), rng=rng, cache=cache, n=jnp.zeros((b,), jnp.int32), xb=xb0,
           prev=jnp.zeros((b, bs), jnp.int32), pending=jnp.zeros((b,), bool), last=last,
           logits=jnp.zeros((b, bs, vocab), jnp.float32), stale=jnp.ones((b,), bool), i=jnp.zeros((b,), jnp.int32),
           active=jnp.ones((b,), bool), done=jnp.zeros((b,), bool),
           out=jnp.full((b, num_blocks * bs), pad_id, jnp.int32), nfe=jnp.int32(1), trace=trace0,
           forwards=jnp.zeros((b, num_blocks), jnp.int32))
  s = jax.lax.while_loop(lambda s: jnp.any(s["active"]) & (s["it"] < max_iters), body, s)

  raw = s["out"]
  width = num_blocks * bs
  # Generated tokens start after each row's prompt tail: shift rows left by `tail`.
  gen = jax.vmap(lambda row, t: jax.lax.dynamic_slice_in_dim(jnp.pad(row, (0, bs), constant_values=pad_id), t,
                                                              width))(raw, tail)
  idx = jnp.arange(width)[None]
  n_gen = width - tail
  if eos_id is not None:
    is_eos = (gen == eos_id) & (idx < n_gen[:, None])
    first = jnp.where(jnp.any(is_eos, -1), jnp.argmax(is_eos, -1), n_gen)
    lengths = jnp.minimum(first + 1, n_gen).astype(jnp.int32)
  else:
    lengths = n_gen.astype(jnp.int32)
  tokens = jnp.where(idx < lengths[:, None], gen, pad_id)
  return BlockDiffusionResult(tokens, raw, lengths, s["done"], s["nfe"], s["forwards"],
                              s["trace"] if return_trace else None)


def sample_block_diffusion(params, model, prompt, prompt_lengths, *, rng, block_size: int, num_blocks: int,
                           strategy: str = "topk_confidence", steps_per_block: Optional[int] = None,
                           threshold: float = 0.9, factor: float = 1.0, gamma: float = 0.35,
                           sub_block_size: Optional[int] = None, token_shift: bool = False,
                           kv_write: str = "fused", temperature=0.0, top_k: int = 0, top_p: float = 1.0,
                           greedy: bool = False, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                           padding_side: str = "right", return_trace: bool = False) -> BlockDiffusionResult:
  """Generate ``num_blocks`` blocks of ``block_size`` after ``prompt [b, P]`` (ragged: ``prompt_lengths [b]``,
  each in ``[1, P]``, padding on ``padding_side``).

  Strategies (anchors §4): ``first_hitting`` (random positions, ``k = ceil(B / steps_per_block)`` per step; the
  default k = 1 is BD3's exact first-hitting sampler), ``ddpm_cache`` (``steps_per_block`` time steps, each masked
  token unmasks w.p. ``(t - s) / t``; steps that change nothing reuse the last logits, no forward),
  ``topk_confidence`` (k most confident), ``threshold`` (Fast-dLLM: top-1 plus every confidence >= τ),
  ``dynamic`` (SDAR: every confidence > τ if there are >= k of them, else top-k), ``factor`` (Fast-dLLM factor
  rule, ``factor`` = f), ``entropy_bounded`` (lowest-entropy prefix with total entropy <= ``gamma``).
  ``sub_block_size`` (Fast-dLLM v2) restricts commits to the leftmost sub-block with masks. ``kv_write``:
  ``"fused"`` (default) or ``"separate"`` (module docstring). ``temperature == 0`` (default) or ``greedy`` takes argmax
  tokens; confidences are probabilities of the chosen token under the processed ([MASK]-free, temperature,
  top-k, top-p) distribution. ``eos_id`` stops rows independently after the block holding their first EOS.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
  if kv_write not in KV_WRITES:
    raise ValueError(f"kv_write must be one of {KV_WRITES}, got {kv_write!r}.")
  if model.config.mask_token_id is None:
    raise ValueError("block diffusion needs model.config.mask_token_id (the [MASK] id the model was trained with).")
  if block_size < 1 or num_blocks < 1:
    raise ValueError(f"block_size ({block_size}) and num_blocks ({num_blocks}) must be >= 1.")
  prompt, lens = common.right_padded(prompt, prompt_lengths, padding_side)
  default_steps = block_size
  steps = default_steps if steps_per_block is None else int(steps_per_block)
  if strategy == "ddpm_cache":
    if steps < 1:
      raise ValueError(f"steps_per_block must be >= 1 for ddpm_cache, got {steps}.")
  elif not 1 <= steps <= block_size:
    raise ValueError(f"steps_per_block must be in [1, block_size={block_size}], got {steps}.")
  if sub_block_size is not None and (sub_block_size < 1 or block_size % sub_block_size):
    raise ValueError(f"sub_block_size={sub_block_size} must be a positive divisor of block_size={block_size}.")
  k = -(-block_size // steps) if strategy != "ddpm_cache" else 1
  greedy, temperature, pad_id = common.decoding_defaults(temperature, greedy, pad_id, eos_id)
  return _sample_bd(params, prompt, lens, rng, temperature, jnp.float32(threshold),
                    jnp.float32(factor), jnp.float32(gamma), model=model, block_size=int(block_size),
                    num_blocks=int(num_blocks), strategy=strategy, k=k, steps=steps,
                    sub_block_size=int(sub_block_size or 0), token_shift=bool(token_shift),
                    fused_write=kv_write == "fused", top_k=int(top_k), top_p=float(top_p), greedy=greedy,
                    eos_id=eos_id, pad_id=pad_id, return_trace=bool(return_trace))
