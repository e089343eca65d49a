"""TiDAR decoding: draft with the diffusion half, verify with the AR half, in ONE forward per step.

docs/algorithms.md §3.4, §5 (arXiv 2511.08923).

State between steps (per row): the committed prefix in the KV cache (length ``L``), the last emitted token ``y`` (at
position ``L``, not yet cached) and ``B-1`` drafts ``d_1..d_{B-1}`` for positions ``L+1..L+B-1`` with the processed
distributions ``q_i`` they were sampled from. One step forwards ``B + B*B`` tokens::

    [y, d_1 .. d_{B-1} | M^(0) | M^(1) | .. | M^(B-1)]      (each M^(j) = B [MASK] tokens)

* rows ``y, d_i`` are causal over the cache and each other (AR rows); row ``y`` gives ``p_1`` (for ``d_1``), row
  ``d_i`` gives ``p_{i+1}``, row ``d_{B-1}`` the bonus distribution ``p_B``;
* pre-draft block ``M^(j)`` (one per acceptance length ``j = 0..B-1``) is bidirectional inside itself, sees the
  cache and ``y, d_1..d_j`` and no other block; as in training (:mod:`ardiff.objectives.tidar`) it predicts the
  ``B`` positions right after its visible prefix: ``L+j+1 .. L+j+B`` (explicit RoPE positions).

Verification is the speculative rule (:func:`ardiff.sampling.rejection.verify`): accept ``d_i`` w.p.
``min(1, p_i/q_i)``, correction from ``norm(max(0, p - q))`` at the first rejection, bonus from ``p_B`` if all are
accepted. With ``j`` drafts accepted, the correction/bonus ``y'`` lands at ``L+j+1`` = the FIRST slot of ``M^(j)``;
that slot is unused (``y'`` comes from ``p``), and the block's remaining ``B-1`` slots (positions ``L+j+2..``, each
sampled independently from its one-step-diffusion marginal, remembered as ``q``) become the next drafts. Then
``y, d_1..d_j`` are committed (``rewind_to(L + 1 + j)``); rejected drafts and all pre-draft rows are never committed.
Exactness holds for any draft choice as long as ``q`` is the distribution the draft was drawn from, so samples follow
the model's AR mode (its causal half) exactly; greedy mode equals greedy AR decoding token for token.

Bootstrap: prefill the prompt (causal), draw ``y_0 ~ p``, then one forward ``[y_0 | M]`` (block sees the cache and
``y_0``, positions ``L+1..L+B``) whose first ``B-1`` slots are the first drafts.

Ragged batches: the step mask is relative to each row's cache length, so :class:`TiDARDecodeMask` carries the per-row
``base`` (= ``cache.lengths[:, None, None]``, a traced array) and is only evaluated by the XLA attention path
(``allowed_bqk`` broadcasts ``q [b, T, 1]`` against ``k [1, 1, S]``); the Pallas kernels take static masks only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ardiff import attention as attention_lib
from ardiff import masks as masks_lib
from ardiff.sampling import common
from ardiff.sampling.common import finalize, prefill, row_done, write_rows
from ardiff.sampling.rejection import check_accept_rule, verify


@dataclasses.dataclass(frozen=True, eq=False)
class TiDARDecodeMask(masks_lib.Mask):
  """Decode-step mask over ``[n_causal AR rows | num_blocks blocks of block_size]`` placed after a cache of length
  ``base`` (an int, or an array broadcasting against ``q``, e.g. ``lengths[:, None, None]`` for ragged rows).

  Relative indices ``r = q - base``, ``c = k - base`` (``c < 0``: cache, always visible). AR row ``r < n_causal``
  sees ``c <= r``; block row ``r`` of block ``j = (r - n_causal) // block_size`` sees AR rows ``c <= j`` and its own
  block (bidirectional), nothing else. Hashed by identity (``base`` may be a traced array).
  """

  n_causal: int
  block_size: int
  base: Any = 0

  def predicate(self, q, k):
    c_n, bs = self.n_causal, self.block_size
    r, c = q - self.base, k - self.base
    ar_row = r < c_n
    j = (r - c_n) // bs
    causal = ar_row & (c <= r)
    block_prefix = ~ar_row & (c <= j)
    own_block = ~ar_row & (c >= c_n) & ((c - c_n) // bs == j)
    return causal | block_prefix | own_block


def decode_inputs(y, drafts, lengths, block_size: int, mask_id: int):
  """Tokens ``[b, B + B*B]`` and positions of one TiDAR step (see the module docstring)."""
  b = y.shape[0]
  bs = block_size
  tokens = jnp.concatenate([y[:, None], drafts, jnp.full((b, bs * bs), mask_id, jnp.int32)], axis=1)
  ar_pos = jnp.arange(bs, dtype=jnp.int32)
  block_pos = (1 + jnp.arange(bs, dtype=jnp.int32)[:, None] + jnp.arange(bs, dtype=jnp.int32)[None, :]).reshape(-1)
  positions = lengths[:, None] + jnp.concatenate([ar_pos, block_pos])[None, :]
  return tokens, positions


class TiDARResult(NamedTuple):
  tokens: jax.Array  # int32 [b, max_new]; pad_id after a row's EOS
  lengths: jax.Array  # int32 [b]
  done: jax.Array  # bool [b]
  nfe: jax.Array  # int32: forwards (prefill 1 + bootstrap 1 + one per step)
  steps: jax.Array  # int32: draft+verify steps
  accepted: jax.Array  # int32 [b]: accepted drafts per row


@functools.partial(jax.jit, static_argnames=("model", "block_size", "max_new_tokens", "top_k", "top_p", "greedy",
                                             "eos_id", "pad_id", "accept_rule"))
def _sample_tidar(params, prompt, prompt_lengths, rng, temperature, *, model, block_size, max_new_tokens, top_k,
                  top_p, greedy, eos_id, pad_id, accept_rule):
  cfg = model.config
  mask_id = cfg.mask_token_id
  b, p = prompt.shape
  bs = block_size
  proc = lambda lg: common.process_logits(lg, mask_token_id=mask_id, temperature=temperature, top_k=top_k,
                                          top_p=top_p)
  sample = lambda key, lg: common.sample_from_logits(key, lg, greedy=greedy)
  rows = jnp.arange(b)

  # Active rows write at L < P + max_new; finished rows keep writing (never committing) a little further.
  cap = p + max_new_tokens + 2 * bs + bs * bs + 1
  cache, last = prefill(params, model, prompt, prompt_lengths, cap, masks_lib.Causal())
  rng, k_y, k_d = jax.random.split(rng, 3)
  y = sample(k_y, proc(last))
  # Bootstrap drafts: [y | M] with the block seeing cache + y at positions L+1..L+B; keep slots 0..B-2.
  lengths = cache.lengths
  boot_tokens = jnp.concatenate([y[:, None], jnp.full((b, bs), mask_id, jnp.int32)], axis=1)
  boot_pos = lengths[:, None] + jnp.arange(bs + 1, dtype=jnp.int32)[None, :]
  out = model.apply({"params": params}, boot_tokens, positions=boot_pos, cache=cache,
                    mask=TiDARDecodeMask(1, bs, lengths[:, None, None]))
  q_logits = proc(out.logits[:, 1:bs])
  drafts = sample(k_d, q_logits)

  buf = jnp.full((b, max_new_tokens + bs + 1), pad_id, jnp.int32).at[:, 0].set(y)

  def cond(s):
    return ~jnp.all(row_done(s["buf"], s["n_out"], max_new_tokens, eos_id))

  def body(s):
    active = ~row_done(s["buf"], s["n_out"], max_new_tokens, eos_id)
    rng, k_ver, k_draft = jax.random.split(s["rng"], 3)
    cache = s["cache"]
    lengths = cache.lengths
    tokens, positions = decode_inputs(s["y"], s["drafts"], lengths, bs, mask_id)
    out = model.apply({"params": params}, tokens, positions=positions, cache=cache,
                      mask=TiDARDecodeMask(bs, bs, lengths[:, None, None]))
    p_logits = proc(out.logits[:, :bs])  # p_1 .. p_B
    n, y_new = verify(k_ver, p_logits, s["q_logits"], s["drafts"], greedy=greedy, accept_rule=accept_rule)
    idx = jnp.arange(bs)[None]
    emitted = jnp.where(idx < n[:, None], jnp.concatenate([s["drafts"], s["drafts"][:, :1]], 1), y_new[:, None])
    buf = write_rows(s["buf"], emitted, s["n_out"], active)
    block = out.logits[:, bs:].reshape(b, bs, bs, -1)[rows, n]  # M^(n): [b, B, V]; slot 0 is y_new's position
    q_new = proc(block[:, 1:])
    d_new = sample(k_draft, q_new)
    keep = active[:, None]
    return dict(rng=rng, cache=out.cache.rewind_to(jnp.where(active, lengths + 1 + n, lengths)), buf=buf,
                n_out=jnp.where(active, s["n_out"] + n + 1, s["n_out"]), y=jnp.where(active, y_new, s["y"]),
                drafts=jnp.where(keep, d_new, s["drafts"]), q_logits=jnp.where(keep[..., None], q_new, s["q_logits"]),
                accepted=s["accepted"] + jnp.where(active, n, 0), steps=s["steps"] + 1)

  s = dict(rng=rng, cache=cache, buf=buf, n_out=jnp.ones((b,), jnp.int32), y=y, drafts=drafts, q_logits=q_logits,
           accepted=jnp.zeros((b,), jnp.int32), steps=jnp.int32(0))
  s = jax.lax.while_loop(cond, body, s)
  tokens, lengths, done = finalize(s["buf"], s["n_out"], max_new_tokens, eos_id, pad_id)
  return TiDARResult(tokens, lengths, done, 2 + s["steps"], s["steps"], s["accepted"])


def sample_tidar(params, model, prompt, prompt_lengths, *, rng, max_new_tokens: int, block_size: int = 4,
                 temperature=1.0, top_k: int = 0, top_p=1.0, greedy: bool = False, eos_id: Optional[int] = None,
                 pad_id: Optional[int] = None, padding_side: str = "right",
                 accept_rule: str = "exact") -> TiDARResult:
  """TiDAR draft+verify decoding (``block_size`` B: B-1 drafts per step, B+B*B query rows per forward).

  Same prompt conventions as :func:`ardiff.sampling.ar.sample_ar` (ragged prompts, either ``padding_side``). Samples
  follow the model's AR mode exactly; ``temperature == 0``/``greedy`` equals greedy ``sample_ar``. Needs
  ``model.config.mask_token_id`` and the XLA attention path (``attention_impl`` 'xla', or 'auto' on CPU): the step
  mask carries traced per-row offsets.
  """
  if model.config.mask_token_id is None:
    raise ValueError("TiDAR needs model.config.mask_token_id (the pre-draft slots are [MASK] tokens).")
  if attention_lib.resolve_impl(model.config.attention_impl) != "xla":
    raise ValueError("TiDAR decoding needs the XLA attention path (attention_impl='xla'): its step mask depends on "
                     "per-row cache lengths, which the Pallas kernels' static masks cannot express.")
  if block_size < 2:
    raise ValueError(f"block_size must be >= 2 (B-1 drafts per step), got {block_size}.")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  check_accept_rule(accept_rule)
  common.check_decoding_args(model.config, top_k=top_k, top_p=top_p, eos_id=eos_id)
  prompt, prompt_lengths = common.right_padded(prompt, prompt_lengths, padding_side)
  greedy, temperature, pad_id = common.decoding_defaults(temperature, greedy, pad_id, eos_id)
  return _sample_tidar(params, prompt, prompt_lengths, rng,
                       temperature, model=model, block_size=int(block_size),
                       max_new_tokens=int(max_new_tokens), top_k=int(top_k), top_p=float(top_p), greedy=greedy,
                       eos_id=eos_id, pad_id=pad_id, accept_rule=accept_rule)
