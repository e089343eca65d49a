"""DiffuSpec: a block-diffusion drafter proposes ``k`` tokens in a few forwards, an AR target verifies them in one.

docs/sampling.md "DiffuSpec" (DiffuSpec, 2025: diffusion drafters for speculative decoding). State per row: the
target's cache holds the committed tokens up to ``L - 1``; the last emitted token ``y`` (position ``L - 1``) is not
cached yet, as in :mod:`ardiff.sampling.speculative`. One step:

1. **Draft** (``draft_steps`` = S forwards of the block-diffusion model, ``BlockCausal(B)``). The drafter's cache
   holds only WHOLE clean blocks (length ``A``, a multiple of ``B``): a partial block's K/V depend on every token of
   the block, so the known tail ``x[A:L]`` is re-fed every forward, followed by ``k`` draft slots and [MASK] filler
   up to a static window of ``W`` tokens (a multiple of ``B``). The slots are filled LEFT TO RIGHT on a fixed
   schedule: forward ``f`` samples slots ``c_{f-1} .. c_f - 1`` (``c_f = ceil(k (f+1) / S)``), each independently
   from its processed marginal ``q_i`` given the tail and the slots filled by earlier forwards. Slot ``i``'s draw
   thus depends only on slots ``< i``, and ``q_i`` is exactly the conditional law it was drawn from, which is all
   the verification needs. (A confidence-ordered fill would sample slot ``i`` given LATER slots; its ``q_i`` would
   then not be the conditional of ``d_i`` given ``d_<i``, and the rule would no longer be exact.)
2. **Verify**: one cached target forward over ``[y, d_1..d_k]`` gives ``p_1..p_{k+1}``;
   :func:`ardiff.sampling.rejection.verify` accepts ``n`` drafts and draws the correction (or the bonus from
   ``p_{k+1}`` when all are accepted). The emitted tokens follow the target's processed AR law exactly (tested by
   chi-square over every emitted position, bonus included); greedy mode equals greedy AR decoding.
3. **Commit**: the target's cache is rewound to ``L + n``; the drafter's to ``floor(L / B) * B``: the whole blocks
   that were clean when this step's drafting began, whose K/V the draft forwards computed exactly (a clean block
   never sees later blocks under ``BlockCausal``). Blocks completed by this step are written by the next step's
   forwards as part of its known tail (ACDiT's lazy write), so the tail is at most ``B + k`` tokens and
   ``W = ceil((B + 2k) / B) * B``.

``guide=τ`` (FreeCache-style AR-guided unmasking, training-free, LOSSY): instead of the rejection test, draft ``d_i``
is kept while the target agrees with it, ``p_i(d_i) >= τ · max_v p_i(v)`` (τ = 1: the target's top-1), and the
first token it does not keep is replaced by a draw from ``p_i`` itself (the bonus from ``p_{k+1}`` as before). Drafts
the target finds plausible are committed whatever their ``q``, so more are accepted than by the exact rule, and the
emitted law is no longer the target's: its cost is measured (gen-PPL), not assumed. Greedy decoding with ``τ = 1``
is still greedy AR.

The target may be any model run with a ``Causal`` mask: an AR run, or a TiDAR run in its AR mode. The drafter is
a block-diffusion model predicting ``x_0`` at each masked position; with ``draft_token_shift`` (a Fast-dLLM v2 run,
trained with token shift) slot ``i`` is predicted by the window row before it instead. That row always exists: the
window starts with at least one known token (``A <= floor(L_prev / B) * B <= L_prev < L``; at the first step
``A = floor(P / B) * B < P + 1 = L``). ``nfe`` counts target forwards
(prefill 1 + one per step); ``draft_nfe`` drafter forwards (prefill 1 + S per step).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ardiff import masks as masks_lib
from ardiff.sampling import common
from ardiff.sampling.common import finalize, prefill, row_done, write_rows
from ardiff.sampling.rejection import check_accept_rule, verify


class DiffuSpecResult(NamedTuple):
  tokens: jax.Array  # int32 [b, max_new]; pad_id after a row's EOS
  lengths: jax.Array  # int32 [b] generated tokens per row (EOS included)
  done: jax.Array  # bool [b] row emitted EOS
  nfe: jax.Array  # int32: target forwards (prefill counts as 1)
  draft_nfe: jax.Array  # int32: drafter forwards (prefill counts as 1)
  steps: jax.Array  # int32: draft+verify steps run
  accepted: jax.Array  # int32 [b]: accepted drafts per row
  trace: Optional[dict]  # if requested, per step s and draft forward f: 'start' [S_max, b] (the drafter cache
  #   length A), 'inputs' [S_max, S, b, W] (the window fed at positions A..A+W), 'slots' [S_max, b] (the first draft
  #   slot's window index, L - A), 'logits' [S_max, S, b, k, V] (raw drafter logits predicting the k slots: their
  #   own rows, or the rows before them with draft_token_shift)


def fill_schedule(num_draft: int, draft_steps: int) -> np.ndarray:
  """``c [S + 1]``: forward ``f`` fills slots ``c[f] .. c[f+1] - 1`` (left to right, as evenly as possible)."""
  return np.array([-(-num_draft * f // draft_steps) for f in range(draft_steps + 1)], np.int32)


def window_size(block_size: int, num_draft: int) -> int:
  """Static drafter window: the known tail (<= B + k) plus k slots, rounded up to whole blocks."""
  return -(-(block_size + 2 * num_draft) // block_size) * block_size


def guided_verify(rng, p_logits, drafts, *, guide, greedy: bool):
  """FreeCache-style acceptance (lossy, module docstring): ``p_logits [b, k+1, V]`` processed target logits,
  ``drafts [b, k]``. Returns ``(n_accepted [b], next_token [b])``: the longest prefix of drafts with
  ``p_i(d_i) >= guide * max p_i``, then a draw from ``p_{n+1}`` (argmax when greedy)."""
  k = drafts.shape[1]
  logp = jax.nn.log_softmax(p_logits, axis=-1)
  lp = jnp.take_along_axis(logp[:, :k], drafts[..., None], axis=-1)[..., 0]
  ok = lp >= jnp.log(jnp.asarray(guide, jnp.float32)) + jnp.max(logp[:, :k], axis=-1)
  n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)
  p_n = jnp.take_along_axis(p_logits, n[:, None, None], axis=1)[:, 0]
  return n, common.sample_from_logits(rng, p_n, greedy=greedy)


def _gather_rows(x, idx):
  """``x [b, n, ...]`` at per-row indices ``idx [b, m]`` -> ``[b, m, ...]``."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=("model", "draft_model", "block_size", "num_draft", "draft_steps",
                                             "max_new_tokens", "top_k", "top_p", "greedy", "eos_id", "pad_id",
                                             "accept_rule", "guide", "draft_token_shift",
                                             "return_trace"))
def _sample_diffuspec(params, draft_params, prompt, prompt_lengths, rng, temperature, *, model, draft_model,
                      block_size, num_draft, draft_steps, max_new_tokens, top_k, top_p, greedy, eos_id, pad_id,
                      accept_rule, guide, draft_token_shift, return_trace):
  b, p = prompt.shape
  bs, k, n_fwd = block_size, num_draft, draft_steps
  w = window_size(bs, k)
  vocab = model.config.vocab_size
  d_mask_id = draft_model.config.mask_token_id
  sched = fill_schedule(k, n_fwd)
  causal, block_causal = masks_lib.Causal(), masks_lib.BlockCausal(bs)
  proc_t = lambda lg: common.process_logits(lg, mask_token_id=model.config.mask_token_id, temperature=temperature,
                                            top_k=top_k, top_p=top_p)
  proc_d = lambda lg: common.process_logits(lg, mask_token_id=d_mask_id, temperature=temperature, top_k=top_k,
                                            top_p=top_p)
  sample = lambda key, lg: common.sample_from_logits(key, lg, greedy=greedy)

  cap_t = p + max_new_tokens + 2 * k + 2  # finished rows keep writing (never committing) past their length
  cap_d = p + max_new_tokens + k + 2 + w  # the window starts at A <= L <= p + max_new + k + 1
  tcache, t_last = prefill(params, model, prompt, prompt_lengths, cap_t, causal)
  dcache, _ = prefill(draft_params, draft_model, prompt, (prompt_lengths // bs) * bs, cap_d, block_causal)
  rng, key = jax.random.split(rng)
  y = sample(key, proc_t(t_last))
  seq = jnp.pad(prompt, ((0, 0), (0, cap_d - p)))  # committed tokens at their absolute positions
  seq = write_rows(seq, y[:, None], prompt_lengths, jnp.ones((b,), bool))
  buf = jnp.full((b, max_new_tokens + k + 1), pad_id, jnp.int32).at[:, 0].set(y)
  slot_idx = jnp.arange(k)

  def draft(dcache, seq, length, rng):
    """S drafter forwards: drafts [b, k], the processed logits they were drawn from [b, k, V], the last forward's
    cache (K/V of the window written, lengths unchanged), and the trace pieces."""
    start = dcache.lengths
    tail = length - start  # [b] known tokens at the head of the window, 0 .. B + k
    known = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, w))(seq, start)
    j = jnp.arange(w)[None]
    slot = j - tail[:, None]  # [b, W]: draft slot index where 0 <= slot < k
    is_slot = (slot >= 0) & (slot < k)
    base = jnp.where(j < tail[:, None], known, d_mask_id)
    at = tail[:, None] + slot_idx[None]  # [b, k] window index of each slot

    def one(carry, xs):
      drafts, q_logits, _ = carry
      lo, hi, key = xs
      filled = slot_idx < lo  # [k]: slots drawn by earlier forwards
      prev = _gather_rows(jnp.where(filled[None], drafts, d_mask_id), jnp.clip(slot, 0, k - 1))
      inputs = jnp.where(is_slot, prev, base)
      out = draft_model.apply({"params": draft_params}, inputs, mask=block_causal, cache=dcache)
      raw = _gather_rows(out.logits, at - 1 if draft_token_shift else at)  # [b, k, V]; at >= tail >= 1
      ql = proc_d(raw)
      tok = sample(key, ql)
      new = (slot_idx >= lo) & (slot_idx < hi)
      drafts = jnp.where(new[None], tok, drafts)
      q_logits = jnp.where(new[None, :, None], ql, q_logits)
      return (drafts, q_logits, out.cache), (inputs, raw)

    init = (jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k, vocab), jnp.float32), dcache)
    xs = (jnp.asarray(sched[:-1]), jnp.asarray(sched[1:]), jax.random.split(rng, n_fwd))
    (drafts, q_logits, dcache), (inputs, raws) = jax.lax.scan(one, init, xs)
    return drafts, q_logits, dcache, (start, tail, inputs, raws)

  s_max = max_new_tokens
  trace = dict(start=jnp.zeros((s_max, b), jnp.int32), slots=jnp.zeros((s_max, b), jnp.int32),
               inputs=jnp.zeros((s_max, n_fwd, b, w), jnp.int32),
               logits=jnp.zeros((s_max, n_fwd, b, k, vocab), jnp.float32)) if return_trace else {}

  def cond(s):
    return ~jnp.all(row_done(s["buf"], s["n_out"], max_new_tokens, eos_id))

  def body(s):
    active = ~row_done(s["buf"], s["n_out"], max_new_tokens, eos_id)
    rng, k_draft, k_ver = jax.random.split(s["rng"], 3)
    lt = s["tcache"].lengths
    length = lt + 1  # committed tokens, y included
    drafts, q_logits, dcache, (start, tail, inputs, raws) = draft(s["dcache"], s["seq"], length, k_draft)
    out = model.apply({"params": params}, jnp.concatenate([s["y"][:, None], drafts], 1), mask=causal,
                      cache=s["tcache"])
    if guide is None:
      n, y_new = verify(k_ver, proc_t(out.logits), q_logits, drafts, greedy=greedy, accept_rule=accept_rule)
    else:
      n, y_new = guided_verify(k_ver, proc_t(out.logits), drafts, guide=guide, greedy=greedy)
    idx = jnp.arange(k + 1)[None]
    emitted = jnp.where(idx < n[:, None], jnp.concatenate([drafts, drafts[:, :1]], 1), y_new[:, None])
    tr = s["trace"]
    if return_trace:
      st = s["steps"]
      tr = dict(start=tr["start"].at[st].set(start), slots=tr["slots"].at[st].set(tail),
                inputs=tr["inputs"].at[st].set(inputs), logits=tr["logits"].at[st].set(raws))
    return dict(rng=rng, trace=tr,
                tcache=out.cache.rewind_to(jnp.where(active, lt + 1 + n, lt)),
                dcache=dcache.rewind_to(jnp.where(active, (length // bs) * bs, s["dcache"].lengths)),
                seq=write_rows(s["seq"], emitted, length, active),
                buf=write_rows(s["buf"], emitted, s["n_out"], active),
                n_out=jnp.where(active, s["n_out"] + n + 1, s["n_out"]),
                y=jnp.where(active, y_new, s["y"]),
                accepted=s["accepted"] + jnp.where(active, n, 0), steps=s["steps"] + 1)

  s = dict(rng=rng, trace=trace, tcache=tcache, dcache=dcache, seq=seq, buf=buf, n_out=jnp.ones((b,), jnp.int32),
           y=y, accepted=jnp.zeros((b,), jnp.int32), steps=jnp.int32(0))
  s = jax.lax.while_loop(cond, body, s)
  tokens, lengths, done = finalize(s["buf"], s["n_out"], max_new_tokens, eos_id, pad_id)
  return DiffuSpecResult(tokens, lengths, done, 1 + s["steps"], 1 + n_fwd * s["steps"], s["steps"], s["accepted"],
                         s["trace"] if return_trace else None)


def sample_diffuspec(params, model, draft_params, draft_model, prompt, prompt_lengths, *, rng, max_new_tokens: int,
                     block_size: int, num_draft: int = 4, draft_steps: int = 1, temperature=1.0, top_k: int = 0,
                     top_p=1.0, greedy: bool = False, eos_id: Optional[int] = None, pad_id: Optional[int] = None,
                     padding_side: str = "right", accept_rule: str = "exact", guide: Optional[float] = None,
                     draft_token_shift: bool = False, return_trace: bool = False) -> DiffuSpecResult:
  """Sample from the AR ``model`` (target, ``Causal``) with the block-diffusion ``draft_model`` (``BlockCausal(
  block_size)``, its training block size) proposing ``num_draft`` tokens in ``draft_steps`` forwards per step.

  Same prompt conventions as :func:`ardiff.sampling.ar.sample_ar` (``prompt [b, P]``, ragged ``prompt_lengths`` in
  ``[1, P]``, ``padding_side``). The samples follow the target's processed distribution exactly
  (``accept_rule="exact"``; the others are negative controls, :mod:`ardiff.sampling.rejection`); ``temperature == 0``
  or ``greedy`` gives greedy AR decoding of the target. ``guide`` in (0, 1] switches to the lossy FreeCache-style
  acceptance (module docstring); None (default) is the exact rule. ``draft_token_shift`` must match how the
  drafter was trained (its run's ``objective.token_shift``: True for the Fast-dLLM v2 recipe): with the wrong
  setting the samples stay exact, but the drafts are read from the wrong rows and are rarely accepted.
  """
  if max_new_tokens < 1 or num_draft < 1 or block_size < 1:
    raise ValueError(f"max_new_tokens ({max_new_tokens}), num_draft ({num_draft}) and block_size ({block_size}) must "
                     "be >= 1.")
  if not 1 <= draft_steps <= num_draft:
    raise ValueError(f"draft_steps={draft_steps} must lie in [1, num_draft={num_draft}] (each drafter forward fills "
                     "at least one slot).")
  if draft_model.config.vocab_size != model.config.vocab_size:
    raise ValueError(f"drafter vocab {draft_model.config.vocab_size} != target vocab {model.config.vocab_size}.")
  if draft_model.config.mask_token_id is None:
    raise ValueError("the drafter needs model.config.mask_token_id (a block-diffusion run's [MASK] id).")
  check_accept_rule(accept_rule)
  if guide is not None and not 0.0 < guide <= 1.0:  # NaN fails too
    raise ValueError(f"guide must lie in (0, 1] (1: keep drafts that are the target's top-1) or be None (exact), "
                     f"got {guide}.")
  common.check_decoding_args(model.config, top_k=top_k, top_p=top_p, eos_id=eos_id)
  prompt, prompt_lengths = common.right_padded(prompt, prompt_lengths, padding_side)
  greedy, temperature, pad_id = common.decoding_defaults(temperature, greedy, pad_id, eos_id)
  return _sample_diffuspec(params, draft_params, prompt, prompt_lengths, rng, temperature, model=model,
                           draft_model=draft_model, block_size=int(block_size), num_draft=int(num_draft),
                           draft_steps=int(draft_steps), max_new_tokens=int(max_new_tokens), top_k=int(top_k),
                           top_p=float(top_p), greedy=greedy, eos_id=eos_id, pad_id=pad_id,
                           accept_rule=accept_rule, guide=None if guide is None else float(guide),
                           draft_token_shift=bool(draft_token_shift), return_trace=bool(return_trace))
