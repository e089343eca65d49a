"""Text in, text out: one entry point over every sampler, for the trainer's end-of-run samples, the CLI and Colab.

:func:`generate` runs the sampler named by ``sampler`` on token prompts; :func:`default_sampler` picks the family's
own (block diffusion for block-diffusion runs, TiDAR draft+verify for TiDAR runs, AR otherwise).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from ardiff.attention import resolve_impl
from ardiff.sampling.ar import sample_ar
from ardiff.sampling.block_diffusion import sample_block_diffusion
from ardiff.sampling.diffuspec import sample_diffuspec
from ardiff.sampling.speculative import sample_speculative
from ardiff.sampling.tidar import sample_tidar

DEFAULT_PROMPT = "ROMEO.\n"
SAMPLERS = ("ar", "block_diffusion", "tidar", "speculative", "diffuspec")


def encode_prompt(tok, text: str) -> list:
  """``[BOS] + encode(text)``: every sampler takes prompts of any length (block diffusion seeds its first block
  with the prompt's partial last block)."""
  ids = ([tok.bos_id] if tok.bos_id is not None else []) + list(tok.encode(text))
  if not ids:
    raise ValueError("the prompt is empty and the tokenizer has no BOS; give at least one prompt token.")
  return ids


def default_sampler(objective, model) -> str:
  """The family's own decoding: TiDAR falls back to its AR mode (same distribution) under the Pallas kernels,
  whose static masks cannot express the decode step's per-row offsets."""
  if objective.kind == "block_diffusion":
    return "block_diffusion"
  if objective.kind == "tidar" and resolve_impl(model.config.attention_impl) == "xla":
    return "tidar"
  return "ar"


def generate(sampler: str, params, model, prompt, prompt_lengths, *, rng, num_tokens: int, objective=None,
             block_size: Optional[int] = None, draft: Optional[tuple] = None, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, eos_id: Optional[int] = None, **options):
  """Runs one sampler on ``prompt [b, P]`` and returns its result (``tokens``, ``lengths``, ``nfe``, ...).

  ``block_size`` (block diffusion, TiDAR) and the token shift default to ``objective``'s (the run's
  :class:`~ardiff.objectives.ObjectiveConfig`). ``draft = (draft_params, draft_model)`` is the speculative
  drafter (an AR model) or the DiffuSpec drafter (a block-diffusion model; ``block_size`` is then ITS block
  size). ``options`` go to the sampler (block diffusion: ``strategy``, ``threshold``, ``steps_per_block``,
  ``sub_block_size``, ``kv_write``...; speculative: ``num_draft``; diffuspec: ``num_draft``, ``draft_steps``).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
  if block_size is None and sampler in ("block_diffusion", "tidar"):
    if objective is None or objective.kind == "ar":
      raise ValueError(f"the {sampler} sampler needs a block size: pass block_size= (the run is not a "
                       f"{sampler} run).")
    block_size = objective.block_size
  _check_positive_int("num_tokens", num_tokens)
  if block_size is not None:
    _check_positive_int("block_size", block_size)
  common = dict(rng=rng, temperature=temperature, top_p=top_p, top_k=top_k, eos_id=eos_id)
  if sampler == "block_diffusion":
    options.setdefault("token_shift", bool(objective is not None and objective.token_shift))
    return _block_diffusion_tokens(params, model, prompt, prompt_lengths, num_tokens=int(num_tokens),
                                   block_size=int(block_size), **common, **options)
  if sampler == "tidar":
    return sample_tidar(params, model, prompt, prompt_lengths, max_new_tokens=num_tokens, block_size=block_size,
                        **common, **options)
  if sampler == "diffuspec":
    if draft is None or block_size is None:
      raise ValueError("DiffuSpec needs a block-diffusion drafter and its block size: draft=(draft_params, "
                       "draft_model), block_size=B (CLI: --draft_checkpoint DIR of a block-diffusion run).")
    return sample_diffuspec(params, model, draft[0], draft[1], prompt, prompt_lengths, max_new_tokens=num_tokens,
                            block_size=block_size, **common, **options)
  if sampler == "speculative":
    if draft is None:
      raise ValueError("speculative decoding needs a drafter: draft=(draft_params, draft_model) "
                       "(CLI: --draft_checkpoint DIR).")
    return sample_speculative(params, model, draft[0], draft[1], prompt, prompt_lengths, max_new_tokens=num_tokens,
                              **common, **options)
  return sample_ar(params, model, prompt, prompt_lengths, max_new_tokens=num_tokens, **common, **options)


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def _block_diffusion_tokens(params, model, prompt, prompt_lengths, *, num_tokens: int, block_size: int, **kwargs):
  """Block diffusion cut to exactly ``num_tokens`` new tokens per row (fewer only at EOS).

  The sampler works in whole blocks and its first block starts with the prompt's partial last block (``P mod B``
  known tokens), so a row gets ``num_blocks * B - P mod B`` new tokens: enough blocks for the row with the longest
  tail are run, and every row is cut at ``num_tokens``.
  """
  tails = np.asarray(prompt_lengths) % block_size
  num_blocks = int(-(-(int(tails.max()) + num_tokens) // block_size))
  res = sample_block_diffusion(params, model, prompt, prompt_lengths, block_size=block_size, num_blocks=num_blocks,
                               **kwargs)
  return res._replace(tokens=res.tokens[:, :num_tokens], lengths=jnp.minimum(res.lengths, num_tokens),
                      done=res.done & (res.lengths <= num_tokens))  # an EOS past the cut was not emitted


def generate_for_experiment(params, model, exp, tok, *, num_samples: int, num_tokens: int, rng,
                            prompt: str = DEFAULT_PROMPT, temperature: float = 1.0, top_p: float = 0.9,
                            strategy: str = "first_hitting") -> list:
  """``num_samples`` texts of about ``num_tokens`` new tokens from the family's own sampler (``temperature``,
  ``top_p``: the trainer passes ``train.sample_temperature`` / ``train.sample_top_p``).

  ``num_tokens`` is capped to the model's context (``exp.data.seq_len`` minus the prompt): positions past the
  training length are out of distribution, so samples there would read as noise (the trainer's ``train.sample_tokens``
  is documented as capped the same way). ``strategy``: the block-diffusion commit rule (other families ignore it).
  """
  ids = encode_prompt(tok, prompt)
  room = exp.data.seq_len - len(ids)
  if room < 1:
    raise ValueError(f"the sample prompt {prompt!r} is {len(ids)} tokens, leaving no room in the model's context of "
                     f"data.seq_len={exp.data.seq_len}; use a shorter prompt.")
  num_tokens = min(num_tokens, room)
  sampler = default_sampler(exp.objective, model)
  # Block diffusion: BD3-LM's own first-hitting sampler (a uniformly random masked position per step). Committing the
  # most confident position first instead (top-1 confidence) lets an early-training model fill its blocks with what
  # it is surest of, newlines and punctuation: measured on the default run, 15% of the sampled characters were
  # newlines (the corpus: 3.7%) and a third fewer words per sample, against 4% and corpus-like word counts.
  options = dict(strategy=strategy) if sampler == "block_diffusion" else {}
  res = generate(sampler, params, model, np.tile(np.asarray(ids, np.int32), (num_samples, 1)),
                 np.full(num_samples, len(ids)), rng=rng, num_tokens=num_tokens, objective=exp.objective,
                 temperature=temperature, top_p=top_p, eos_id=tok.eos_id, **options)
  text_prompt = tok.decode(ids)
  return [text_prompt + tok.decode([int(t) for t in row[:n]])
          for row, n in zip(np.asarray(res.tokens), np.asarray(res.lengths))]
