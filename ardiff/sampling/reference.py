"""Plain, uncached references for the block-diffusion sampler: what exactness is tested against.

* :func:`reference_block_logits` recomputes, without a cache, the logits of every traced denoising forward.
* :func:`reference_greedy_block_diffusion` is the whole sampler written the slow way: every step forwards the
  full sequence (prompt, finished blocks, current block) under ``BlockCausal(B)`` from position 0, in numpy
  control flow. Greedy decoding with a deterministic commit rule must give the cached sampler's tokens exactly.

Both run one jitted forward per call and are meant for tests and debugging, not for speed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ardiff import masks as masks_lib
from ardiff.sampling import common
from ardiff.sampling.block_diffusion import BlockDiffusionResult
from ardiff.sampling.commit_rules import commit_mask, first_sub_block, token_scores

DETERMINISTIC = ("topk_confidence", "threshold", "dynamic", "factor", "entropy_bounded")


@functools.lru_cache(maxsize=16)
def _uncached(model, block_size):
  """The jitted uncached forward, built once per (model, B): repeated reference calls reuse its compiles."""
  return jax.jit(lambda p, t: model.apply({"params": p}, t, mask=masks_lib.BlockCausal(block_size)).logits)


def reference_block_logits(params, model, prompt, prompt_lengths, result: BlockDiffusionResult, block_size: int,
                           padding_side: str = "right"):
  """``[S, b, B + 1, V]`` uncached logits for every traced (iteration s, row r) with fresh logits (NaN elsewhere):
  rows ``start - 1 .. start + B - 1`` of ``[prompt_r whole blocks, raw_blocks_r[:n*B], inputs[s, r]]``, where
  n is the row's block then and ``start`` where it begins. Entry 0 is the clean prefix's last row
  (``trace['last']``; NaN when the row has no whole block before block 0), entries 1.. are the block's rows
  (``trace['logits']``).
  """
  prompt, lens = (np.asarray(x) for x in common.right_padded(prompt, prompt_lengths, padding_side))
  bs = block_size
  aligned = (lens // bs) * bs
  tr = {key: np.asarray(v) for key, v in result.trace.items()}
  raw = np.asarray(result.raw_blocks)
  cells = np.argwhere(tr["block"] >= 0)  # (s, r) pairs
  length = prompt.shape[1] + raw.shape[1]
  seqs = np.zeros((len(cells), length), np.int32)
  starts = np.zeros(len(cells), np.int64)
  for c, (s, r) in enumerate(cells):
    n = tr["block"][s, r]
    row = np.concatenate([prompt[r, :aligned[r]], raw[r, :n * bs], tr["inputs"][s, r]])
    seqs[c, :len(row)] = row  # trailing padding is invisible under BlockCausal
    starts[c] = aligned[r] + n * bs
  logits = np.asarray(_uncached(model, bs)(params, jnp.asarray(seqs)))
  s_total, b = tr["block"].shape
  out = np.full((s_total, b, bs + 1, logits.shape[-1]), np.nan, np.float32)
  for c, (s, r) in enumerate(cells):
    st = starts[c]
    out[s, r, 1:] = logits[c, st:st + bs]
    if st > 0:
      out[s, r, 0] = logits[c, st - 1]
  return out


def reference_greedy_block_diffusion(params, model, prompt, prompt_lengths, *, block_size: int, num_blocks: int,
                                     strategy: str = "topk_confidence", steps_per_block=None, threshold=0.9,
                                     factor=1.0, gamma=0.35, sub_block_size=None, token_shift=False,
                                     padding_side: str = "right") -> np.ndarray:
  """Greedy block diffusion without a cache, one row at a time: ``int32 [b, num_blocks*B]`` raw blocks (block 0
  starts with the row's prompt tail), comparable to ``BlockDiffusionResult.raw_blocks`` (no EOS handling)."""
  if strategy not in DETERMINISTIC:
    raise ValueError(f"the greedy reference needs a deterministic strategy {DETERMINISTIC}, got {strategy!r}.")
  prompt, lens = (np.asarray(x) for x in common.right_padded(prompt, prompt_lengths, padding_side))
  mask_id = model.config.mask_token_id
  bs = block_size
  k = -(-bs // (steps_per_block or bs))
  fwd = _uncached(model, bs)
  width = prompt.shape[1] + (num_blocks + 1) * bs  # one static shape: one compile
  out = np.zeros((len(lens), num_blocks * bs), np.int32)
  for r, n_prompt in enumerate(lens):
    aligned = (n_prompt // bs) * bs
    seq = list(prompt[r, :aligned])
    for n in range(num_blocks):
      xb = np.full(bs, mask_id, np.int32)
      unknown = np.ones(bs, bool)  # prompt tokens are known, even one equal to [MASK]
      if n == 0:
        xb[:n_prompt - aligned] = prompt[r, aligned:n_prompt]
        unknown[:n_prompt - aligned] = False
      while unknown.any():
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(seq) + bs] = np.concatenate([seq, xb])
        logits = np.asarray(fwd(params, jnp.asarray(padded)))[0]
        block = logits[len(seq):len(seq) + bs]
        if token_shift:  # position 0 of block 0 always holds a prompt token when there is no whole block before
          prev = logits[len(seq) - 1] if seq else np.zeros_like(block[0])
          block = np.concatenate([prev[None], block[:-1]])
        processed = common.process_logits(jnp.asarray(block[None]), mask_token_id=mask_id)
        tok = np.asarray(jnp.argmax(processed, -1))
        conf, entropy = token_scores(processed, jnp.asarray(tok))
        masked = jnp.asarray(unknown)[None]
        if sub_block_size:
          masked = first_sub_block(masked, sub_block_size)
        sel = np.asarray(commit_mask(strategy, masked=masked, conf=conf, entropy=entropy,
                                     rand_score=jnp.zeros((1, bs)), k=k, threshold=threshold, factor=factor,
                                     gamma=gamma))[0]
        xb = np.where(sel, tok[0], xb)
        unknown &= ~sel
      out[r, n * bs:(n + 1) * bs] = xb
      seq.extend(xb)
  return out
