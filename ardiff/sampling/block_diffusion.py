"""Block-diffusion sampling over a block-causal model with an exact KV cache (docs/algorithms.md §4).

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
batches stay exact. Prompt tokens are never re-sampled, even one equal to the [MASK] id. ``token_shift=True`` is
for Dream / Fast-dLLM v2 style models (row ``i-1`` predicts token ``i``): a block's first position is predicted by
the last row of the clean prefix, as in training (:func:`ardiff.objectives.diffusion.diffusion_logits`).

One loop iteration is :func:`denoise_forward` (at most one batched forward, which also writes pending clean
blocks), :func:`record_forward` (bookkeeping), :func:`commit_step` (sample tokens, commit some masked positions)
and :func:`finish_blocks` (clean blocks are recorded; rows stop or move on). Static settings live in
:class:`BlockDiffusionOptions`, the loop state in :class:`DenoiseState`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp

from ardiff import masks as masks_lib
from ardiff.model import KVCache
from ardiff.sampling import common
from ardiff.sampling.block_diffusion_options import KV_WRITES, BlockDiffusionOptions, check_rule_scalars
from ardiff.sampling.commit_rules import (STRATEGIES, commit_mask, first_sub_block, semantic_prefix, shift_logits,
                                          token_scores)

__all__ = ["KV_WRITES", "STRATEGIES", "BlockDiffusionOptions", "BlockDiffusionResult", "DenoiseState", "commit_mask",
           "first_sub_block", "sample_block_diffusion", "shift_logits"]


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


@flax.struct.dataclass
class Knobs:
  """The traced (not static) sampling scalars: changing them does not recompile. All float32 ``[]``."""
  temperature: jax.Array
  threshold: jax.Array
  factor: jax.Array
  gamma: jax.Array


@flax.struct.dataclass
class Trace:
  """Per loop iteration ``s`` and row ``r`` (see :class:`BlockDiffusionResult`); size-0 arrays when not traced."""
  block: jax.Array  # int32 [S, b]
  inputs: jax.Array  # int32 [S, b, B]
  logits: jax.Array  # float32 [S, b, B, V]
  last: jax.Array  # float32 [S, b, V]


@flax.struct.dataclass
class DenoiseState:
  """The loop state; ``b`` rows, block size ``B``, vocabulary ``V``, ``N`` blocks."""
  it: jax.Array  # int32 [] loop iteration
  rng: jax.Array  # PRNG key, split once per iteration
  cache: KVCache  # committed K/V: prompt's whole blocks + written clean blocks (lengths [b])
  last: jax.Array  # float32 [b, V] logits of the clean prefix's last position (token shift)
  tail: jax.Array  # int32 [b] prompt tokens at the start of block 0 (never re-sampled, no EOS check)
  n: jax.Array  # int32 [b] the row's current block index
  xb: jax.Array  # int32 [b, B] the current block: committed tokens, [MASK] elsewhere
  unknown: jax.Array  # bool [b, B] positions of xb still to be generated
  prev: jax.Array  # int32 [b, B] a clean block waiting for its fused K/V write
  pending: jax.Array  # bool [b] the row has a clean block whose K/V is not written yet
  logits: jax.Array  # float32 [b, B, V] the latest raw logits of the row's current block
  stale: jax.Array  # bool [b] `logits` predate the current block's contents (a fresh forward is needed)
  i: jax.Array  # int32 [b] denoising steps taken on the current block (ddpm_cache's time index)
  active: jax.Array  # bool [b] the row still has blocks to denoise
  done: jax.Array  # bool [b] the row emitted EOS
  out: jax.Array  # int32 [b, N*B] clean blocks as recorded (pad_id where not reached)
  nfe: jax.Array  # int32 [] batched forwards run
  forwards: jax.Array  # int32 [b, N] forwards that served each row's block
  trace: Trace


def _block_forward(params, model, opts: BlockDiffusionOptions, cache, tokens):
  return model.apply({"params": params}, tokens, mask=masks_lib.BlockCausal(opts.block_size), cache=cache)


def init_state(params, prompt, prompt_lengths, rng, *, model, opts: BlockDiffusionOptions) -> DenoiseState:
  """Prefill each row's whole prompt blocks; seed block 0 with the prompt's partial tail (known), rest [MASK].

  ``prompt`` int32 ``[b, P]`` right-padded, ``prompt_lengths`` int32 ``[b]``. Writes reach at most
  ``aligned + (N + 1) * B`` (a two-block forward at the last block), inside the cache's capacity.
  """
  b, p = prompt.shape
  bs, vocab, iters = opts.block_size, model.config.vocab_size, opts.max_iters
  aligned = (prompt_lengths // bs) * bs
  tail = prompt_lengths - aligned
  cache, last = common.prefill(params, model, prompt, aligned, p + (opts.num_blocks + 1) * bs,
                        masks_lib.BlockCausal(bs))
  j = jnp.arange(bs)
  is_tail = j[None] < tail[:, None]  # [b, B] block-0 slots that hold prompt tokens
  tail_tokens = jnp.take_along_axis(jnp.pad(prompt, ((0, 0), (0, bs))), aligned[:, None] + j[None], axis=1)
  traced = opts.return_trace
  trace = Trace(block=jnp.full((iters, b) if traced else (0,), -1, jnp.int32),
                inputs=jnp.zeros((iters, b, bs) if traced else (0,), jnp.int32),
                logits=jnp.zeros((iters, b, bs, vocab) if traced else (0,), jnp.float32),
                last=jnp.zeros((iters, b, vocab) if traced else (0,), jnp.float32))
  return DenoiseState(
      it=jnp.int32(0), rng=rng, cache=cache, last=last, tail=tail, n=jnp.zeros((b,), jnp.int32),
      xb=jnp.where(is_tail, tail_tokens, opts.mask_id), unknown=~is_tail, prev=jnp.zeros((b, bs), jnp.int32),
      pending=jnp.zeros((b,), bool), logits=jnp.zeros((b, bs, vocab), jnp.float32), stale=jnp.ones((b,), bool),
      i=jnp.zeros((b,), jnp.int32), active=jnp.ones((b,), bool), done=jnp.zeros((b,), bool),
      out=jnp.full((b, opts.num_blocks * bs), opts.pad_id, jnp.int32), nfe=jnp.int32(1),
      forwards=jnp.zeros((b, opts.num_blocks), jnp.int32), trace=trace)


def denoise_forward(params, s: DenoiseState, *, model, opts: BlockDiffusionOptions):
  """One batched forward, or none when no active row needs fresh logits (ddpm_cache reuse).

  Every active pending (clean) block is written and committed here: with fused writes as the first B of 2B tokens
  ``[clean ; next block]`` (rows without a pending block put their current block first and filler after it, which
  their rows never see under BlockCausal); with separate writes by this forward of the clean block alone, after
  which those rows move on to a fresh block (no logits for it yet). Returns ``(state, served)``: ``served`` bool
  ``[b]`` marks the rows whose ``logits`` are now fresh for their current block. ``stale`` is left for
  :func:`commit_step`.
  """
  bs, mask_id = opts.block_size, opts.mask_id
  pending, stale = s.pending & s.active, s.stale & s.active
  fwd = functools.partial(_block_forward, params, model, opts, s.cache)

  def narrow():  # one block per row; commits the pending (clean) blocks of separate writes
    out = fwd(s.xb)  # writes every row's block at its length; only pending rows commit theirs
    return (out.cache.advance(jnp.where(pending, bs, 0)), out.logits,
            jnp.where(pending[:, None], out.logits[:, -1], s.last))

  def wide():  # [clean ; next] for pending rows, [current ; filler] for the others
    first = jnp.where(pending[:, None], s.prev, s.xb)
    second = jnp.where(pending[:, None], s.xb, mask_id)
    out = fwd(jnp.concatenate([first, second], axis=1))
    block_logits = jnp.where(pending[:, None, None], out.logits[:, bs:], out.logits[:, :bs])
    return (out.cache.advance(jnp.where(pending, bs, 0)), block_logits,
            jnp.where(pending[:, None], out.logits[:, bs - 1], s.last))

  def skip():
    return s.cache, s.logits, s.last

  need = jnp.any(stale | pending)
  branches = [skip, narrow] + ([wide] if opts.fused else [])
  which = jnp.where(need, jnp.where(jnp.any(pending) & opts.fused, 2, 1), 0)
  cache, fresh, last = jax.lax.switch(which, branches)
  # Separate writes: a pending row's forward was its write; its next block has no logits yet.
  served = (stale if opts.fused else stale & ~pending) & need
  s = s.replace(cache=cache, last=last, logits=jnp.where(served[:, None, None], fresh, s.logits),
                pending=s.pending & ~s.active, nfe=s.nfe + need)
  if not opts.fused:  # the rows whose clean block was just written move on to their next block
    s = s.replace(n=s.n + pending, xb=jnp.where(pending[:, None], mask_id, s.xb),
                  unknown=s.unknown | pending[:, None])
  return s, served


def record_forward(s: DenoiseState, served, opts: BlockDiffusionOptions) -> DenoiseState:
  """Count the forward against each served row's block and, if traced, store what it saw."""
  rows = jnp.arange(s.n.shape[0])
  forwards = s.forwards.at[rows, jnp.minimum(s.n, opts.num_blocks - 1)].add(served.astype(jnp.int32))
  trace = s.trace
  if opts.return_trace:
    t = s.it
    put = lambda arr, v: arr.at[t].set(jnp.where(served.reshape((-1,) + (1,) * (v.ndim - 1)), v, arr[t]))
    trace = Trace(block=put(trace.block, s.n), inputs=put(trace.inputs, s.xb), logits=put(trace.logits, s.logits),
                  last=put(trace.last, s.last))
  return s.replace(forwards=forwards, trace=trace)


def commit_step(s: DenoiseState, served, knobs: Knobs, opts: BlockDiffusionOptions):
  """Sample a token at every position, then commit the masked positions the strategy picks (docs/algorithms.md
  §4.2–4.3).

  Rows step when their logits are valid for their current block (just served, or unchanged since). Tokens and
  confidences come from the processed ([MASK]-free, temperature, top-k, top-p) distribution. Returns
  ``(state, stepping)``, ``stepping`` bool ``[b]``.
  """
  pred = shift_logits(s.logits, s.last) if opts.token_shift else s.logits
  rng, k_tok, k_pos = jax.random.split(s.rng, 3)
  tok, processed = common.sample_tokens(k_tok, pred, mask_token_id=opts.mask_id, temperature=knobs.temperature,
                                        top_k=opts.top_k, top_p=opts.top_p, greedy=opts.greedy)
  conf, entropy = token_scores(processed, tok)
  stepping = s.active & (served | ~s.stale)
  masked = s.unknown & stepping[:, None]
  if opts.sub_block_size:
    masked = first_sub_block(masked, opts.sub_block_size)
  if opts.delimiters:
    masked = semantic_prefix(masked, tok, conf, opts.delimiters, opts.delimiter_threshold)
  unmask_prob = 1.0 / jnp.maximum(opts.steps_per_block - s.i, 1).astype(jnp.float32)[:, None]  # (t - s) / t
  sel = commit_mask(opts.strategy, masked=masked, conf=conf, entropy=entropy,
                    rand_score=jax.random.uniform(k_pos, masked.shape), k=opts.k, threshold=knobs.threshold,
                    factor=knobs.factor, gamma=knobs.gamma, unmask_prob=unmask_prob)
  # A stepping row needs a new forward iff it changed; a row that could not step (separate write) needs one too.
  stale = jnp.where(stepping, jnp.any(sel, -1), s.stale | (s.active & ~stepping))
  s = s.replace(rng=rng, xb=jnp.where(sel, tok, s.xb), unknown=s.unknown & ~sel,
                i=jnp.where(stepping, s.i + 1, s.i), stale=stale)
  return s, stepping


def finish_blocks(s: DenoiseState, stepping, opts: BlockDiffusionOptions) -> DenoiseState:
  """Rows whose block is now clean: record it in ``out``, then stop (last block or EOS) or go on to the next block.

  With fused writes the clean block waits in ``prev`` and the next block starts now; with separate writes it stays
  in ``xb`` until :func:`denoise_forward` writes it.
  """
  bs, mask_id = opts.block_size, opts.mask_id
  clean = stepping & ~jnp.any(s.unknown, axis=-1)
  placed = jax.vmap(lambda row, blk, at: jax.lax.dynamic_update_slice_in_dim(row, blk, at, 0))(s.out, s.xb,
                                                                                                s.n * bs)
  done = s.done
  if opts.eos_id is not None:  # an EOS among the block's generated tokens (not the prompt's tail) ends the row
    generated = ~((s.n == 0)[:, None] & (jnp.arange(bs)[None] < s.tail[:, None]))
    done = done | (clean & jnp.any((s.xb == opts.eos_id) & generated, axis=-1))
  finished = clean & ((s.n == opts.num_blocks - 1) | done)
  go_on = clean & ~finished
  s = s.replace(it=s.it + 1, out=jnp.where(clean[:, None], placed, s.out), done=done,
                pending=jnp.where(clean, go_on, s.pending), i=jnp.where(go_on, 0, s.i),
                active=s.active & ~finished)
  if opts.fused:
    s = s.replace(prev=jnp.where(go_on[:, None], s.xb, s.prev), xb=jnp.where(go_on[:, None], mask_id, s.xb),
                  unknown=s.unknown | go_on[:, None], n=s.n + go_on, stale=s.stale | go_on)
  return s


def collect_result(s: DenoiseState, opts: BlockDiffusionOptions) -> BlockDiffusionResult:
  """Generated tokens start after each row's prompt tail: shift rows left by it, cut after the first EOS."""
  bs, pad_id, width = opts.block_size, opts.pad_id, opts.num_blocks * opts.block_size
  raw = s.out
  gen = jax.vmap(lambda row, t: jax.lax.dynamic_slice_in_dim(jnp.pad(row, (0, bs), constant_values=pad_id), t,
                                                              width))(raw, s.tail)
  idx = jnp.arange(width)[None]
  n_gen = width - s.tail
  if opts.eos_id is not None:
    is_eos = (gen == opts.eos_id) & (idx < n_gen[:, None])
    first = jnp.where(jnp.any(is_eos, -1), jnp.argmax(is_eos, -1), n_gen)
    lengths = jnp.minimum(first + 1, n_gen).astype(jnp.int32)
  else:
    lengths = n_gen.astype(jnp.int32)
  tokens = jnp.where(idx < lengths[:, None], gen, pad_id)
  trace = None
  if opts.return_trace:
    trace = dict(block=s.trace.block, inputs=s.trace.inputs, logits=s.trace.logits, last=s.trace.last)
  return BlockDiffusionResult(tokens, raw, lengths, s.done, s.nfe, s.forwards, trace)


@functools.partial(jax.jit, static_argnames=("model", "opts"))
def _sample_bd(params, prompt, prompt_lengths, rng, knobs: Knobs, *, model, opts: BlockDiffusionOptions):
  def body(s):
    s, served = denoise_forward(params, s, model=model, opts=opts)
    s = record_forward(s, served, opts)
    s, stepping = commit_step(s, served, knobs, opts)
    return finish_blocks(s, stepping, opts)

  s = init_state(params, prompt, prompt_lengths, rng, model=model, opts=opts)
  s = jax.lax.while_loop(lambda s: jnp.any(s.active) & (s.it < opts.max_iters), body, s)
  return collect_result(s, opts)


def sample_block_diffusion(params, model, prompt, prompt_lengths, *, rng, block_size: int, num_blocks: int,
                           strategy: str = "topk_confidence", steps_per_block: Optional[int] = None,
                           threshold: float = 0.9, factor: float = 1.0, gamma: float = 0.35,
                           sub_block_size: Optional[int] = None, delimiters=(), delimiter_threshold: float = 0.9,
                           token_shift: bool = False,
                           kv_write: str = "fused", temperature=0.0, top_k: int = 0, top_p: float = 1.0,
                           greedy: bool = False, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                           padding_side: str = "right", return_trace: bool = False) -> BlockDiffusionResult:
  """Generate ``num_blocks`` blocks of ``block_size`` after ``prompt [b, P]`` (ragged: ``prompt_lengths [b]``,
  each in ``[1, P]``, padding on ``padding_side``).

  Strategies (docs/algorithms.md §4.2–4.4): ``first_hitting`` (random positions, ``k = ceil(B / steps_per_block)``
  per step; the default k = 1 is BD3's exact first-hitting sampler), ``ddpm_cache`` (``steps_per_block`` time steps,
  each masked token unmasks w.p. ``(t - s) / t``; steps that change nothing reuse the last logits, no forward),
  ``topk_confidence`` (k most confident), ``threshold`` (Fast-dLLM: top-1 plus every confidence >= τ),
  ``dynamic`` (SDAR: every confidence > τ if there are >= k of them, else top-k), ``factor`` (Fast-dLLM factor
  rule, ``factor`` = f), ``entropy_bounded`` (lowest-entropy prefix with total entropy <= ``gamma``).
  ``sub_block_size`` (Fast-dLLM v2) restricts commits to the leftmost sub-block with masks; ``delimiters`` (token
  ids) ends a step's commits at the first masked position predicted as a delimiter with confidence
  ``>= delimiter_threshold`` (AdaBlock-style, :func:`~ardiff.sampling.commit_rules.semantic_prefix`). ``kv_write``:
  ``"fused"`` (default) or ``"separate"`` (module docstring). ``temperature == 0`` (default) or ``greedy`` takes argmax
  tokens; confidences are probabilities of the chosen token under the processed ([MASK]-free, temperature,
  top-k, top-p) distribution. ``eos_id`` stops rows independently after the block holding their first EOS.
  """
  check_rule_scalars(threshold=threshold, factor=factor, gamma=gamma)
  greedy, temperature, pad_id = common.decoding_defaults(temperature, greedy, pad_id, eos_id)
  opts = BlockDiffusionOptions.create(
      model.config, block_size=int(block_size), num_blocks=int(num_blocks), strategy=strategy,
      steps_per_block=None if steps_per_block is None else int(steps_per_block),
      sub_block_size=None if sub_block_size is None else int(sub_block_size), token_shift=bool(token_shift),
      delimiters=tuple(int(d) for d in delimiters), delimiter_threshold=float(delimiter_threshold),
      kv_write=kv_write, top_k=int(top_k), top_p=float(top_p), greedy=greedy, eos_id=eos_id, pad_id=pad_id,
      return_trace=bool(return_trace))
  knobs = Knobs(temperature=temperature, threshold=jnp.float32(threshold), factor=jnp.float32(factor),
                gamma=jnp.float32(gamma))
  prompt, lens = common.right_padded(prompt, prompt_lengths, padding_side)
  return _sample_bd(params, prompt, lens, rng, knobs, model=model, opts=opts)
