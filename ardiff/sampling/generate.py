"""Text in, text out: the sampler each model family uses, for the trainer's end-of-run samples and the CLI."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from ardiff import masks
from ardiff.sampling import common
from ardiff.sampling.ar import sample_ar
from ardiff.sampling.block_diffusion import sample_block_diffusion

DEFAULT_PROMPT = "ROMEO.\n"


def encode_prompt(tok, text: str, *, multiple_of: int = 1) -> list:
  """``[BOS] + encode(text)``, cut to a multiple of ``multiple_of`` (block-aligned prompts keep the cache exact)."""
  ids = ([tok.bos_id] if tok.bos_id is not None else []) + list(tok.encode(text))
  keep = max(multiple_of, (len(ids) // multiple_of) * multiple_of)
  if keep > len(ids):
    raise ValueError(f"the prompt {text!r} has {len(ids)} tokens; block diffusion needs at least one full block "
                     f"({multiple_of} tokens). Use a longer prompt.")
  return ids[:keep]


def mdlm_sample(params, model, *, rng, batch: int, length: int, bos_id, temperature: float = 1.0) -> jax.Array:
  """MDLM (one block = the whole sequence): start from ``[BOS] + [MASK] * (L - 1)``, commit the most confident
  masked token per step with a full bidirectional forward (no cache: nothing is clean until the end)."""
  mask_id = model.config.mask_token_id
  x = jnp.full((batch, length), mask_id, jnp.int32)
  if bos_id is not None:
    x = x.at[:, 0].set(bos_id)

  def step(i, carry):
    x, rng = carry
    rng, sub = jax.random.split(rng)
    logits = model.apply({"params": params}, x, mask=masks.Full()).logits
    tok, processed = common.sample_tokens(sub, logits, mask_token_id=mask_id, temperature=temperature)
    conf = jnp.take_along_axis(jax.nn.log_softmax(processed, -1), tok[..., None], -1)[..., 0]
    conf = jnp.where(x == mask_id, conf, -jnp.inf)
    pos = jnp.argmax(conf, axis=-1)
    rows = jnp.arange(batch)
    return x.at[rows, pos].set(jnp.where(x[rows, pos] == mask_id, tok[rows, pos], x[rows, pos])), rng

  x, _ = jax.lax.fori_loop(0, length, step, (x, rng))
  return x


def generate_for_experiment(params, model, exp, tok, *, num_samples: int, num_tokens: int, rng,
                            prompt: str = DEFAULT_PROMPT) -> list:
  """``num_samples`` texts of about ``num_tokens`` new tokens from the family's own sampler."""
  kind, bs = exp.objective.kind, exp.objective.block_size
  if kind == "block_diffusion" and bs == exp.data["seq_len"]:
    out = jax.jit(lambda p, r: mdlm_sample(p, model, rng=r, batch=num_samples, length=bs, bos_id=tok.bos_id))(
        params, rng)
    return [tok.decode([int(t) for t in row]) for row in np.asarray(out)]
  if kind == "block_diffusion":
    ids = encode_prompt(tok, prompt, multiple_of=bs)
    prompt_arr = np.tile(np.asarray(ids, np.int32), (num_samples, 1))
    res = sample_block_diffusion(params, model, prompt_arr, np.full(num_samples, len(ids)), rng=rng, block_size=bs,
                                 num_blocks=max(1, num_tokens // bs), strategy="topk_confidence", temperature=1.0,
                                 top_p=0.9, eos_id=tok.eos_id)
    tokens, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
  else:  # AR, and TiDAR's AR mode (its clean half is a causal AR model)
    ids = encode_prompt(tok, prompt)
    prompt_arr = np.tile(np.asarray(ids, np.int32), (num_samples, 1))
    res = sample_ar(params, model, prompt_arr, np.full(num_samples, len(ids)), rng=rng, max_new_tokens=num_tokens,
                    temperature=1.0, top_p=0.9, eos_id=tok.eos_id)
    tokens, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
  text_prompt = tok.decode(ids)
  return [text_prompt + tok.decode([int(t) for t in row[:n]]) for row, n in zip(tokens, lengths)]
