"""Confidence distillation (the dParallel / Learn2PD idea): fine-tune a block-diffusion student on its AR teacher's
own samples, so that it grows confident several positions ahead and a confidence-threshold sampler commits more than
one token per forward.

Why the teacher's samples and not the corpus: a block-diffusion model trained on real text spreads its probability
over every continuation the data allows, so the 2nd-4th positions of a block rarely pass a 0.9 threshold. The AR
teacher's samples are the law the student is later judged against (gen-PPL under the teacher), and they are more
predictable than the data; fitting them moves the student's mass onto what the teacher would say.

The loss on one batch of teacher samples ``tokens [b, l]`` (BOS, prompt, generated tokens, zero padding):

* ``ce``: BD3's NELBO term with the objective's noise (``objective.block_size``, weighting and clip), i.e. the
  ordinary block-diffusion loss, only on teacher samples;
* ``certainty``: dParallel's certainty forcing, the mean entropy (nats) of the student's prediction at the masked
  positions that it already predicts correctly (argmax = the teacher's token); minimising it sharpens right answers
  without pushing wrong ones;
* ``loss = ce + certainty_weight * certainty``.

:func:`teacher_samples` draws the data (deterministic under its rng), :func:`distill_terms` is the loss on given
logits (a pure function, tested against a hand computation), :func:`distill_loss` wires in the student's forward and
:func:`finetune` runs a plain AdamW loop. ``benchmarks/distill.py`` measures tokens/forward vs gen-PPL before/after.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ardiff.objectives import base, diffusion


class TeacherData(NamedTuple):
  tokens: np.ndarray  # int32 [n, prompt_width + num_tokens]: prompt, then the teacher's tokens, zero-padded
  segment_ids: np.ndarray  # int32 [n, same]: 1 on real tokens, 0 on padding
  loss_mask: np.ndarray  # bool [n, same]: the teacher's generated tokens (the prompt is context, not a target)


def teacher_samples(teacher_params, teacher_model, prompts: np.ndarray, prompt_lengths: np.ndarray, *, rng,
                    num_tokens: int, temperature: float = 1.0, top_p: float = 1.0, eos_id=None) -> TeacherData:
  """The AR teacher's continuations of ``prompts [n, P]`` (right-padded, ``prompt_lengths [n]``), laid out as
  training rows. Deterministic under ``rng``: the same key gives the same rows."""
  from ardiff.sampling.ar import sample_ar  # local: ardiff.training stays importable without the samplers' cost
  prompts = np.asarray(prompts, np.int32)
  lens = np.asarray(prompt_lengths, np.int32)
  if prompts.ndim != 2 or lens.shape != prompts.shape[:1]:
    raise ValueError(f"prompts must be [n, P] with prompt_lengths [n]; got {prompts.shape} and {lens.shape}.")
  res = sample_ar(teacher_params, teacher_model, prompts, lens, rng=rng, max_new_tokens=int(num_tokens),
                  temperature=temperature, top_p=top_p, eos_id=eos_id)
  gen, gen_len = np.asarray(res.tokens), np.asarray(res.lengths)
  n, width = prompts.shape
  tokens = np.zeros((n, width + gen.shape[1]), np.int32)
  loss_mask = np.zeros(tokens.shape, bool)
  for r in range(n):
    p, g = int(lens[r]), int(gen_len[r])
    tokens[r, :p] = prompts[r, :p]
    tokens[r, p:p + g] = gen[r, :g]
    loss_mask[r, p:p + g] = True
  segment_ids = (np.arange(tokens.shape[1])[None, :] < (lens + gen_len)[:, None]).astype(np.int32)
  return TeacherData(tokens, segment_ids, loss_mask)


def distill_terms(log_probs: jax.Array, targets: jax.Array, noise: diffusion.Noise, num_maskable):
  """``(ce, certainty)`` from the student's ``log_probs [b, l, V]`` ([MASK] removed) at the noised positions.

  ``ce = sum(masked * weight * -log p(target)) / num_maskable`` (BD3's estimator); ``certainty`` = the mean
  entropy ``-sum_v p_v log p_v`` over masked positions whose argmax is the target (0 when there are none).
  """
  nll = base.gather_nll(log_probs, targets)
  ce = jnp.sum(jnp.where(noise.masked, noise.weight * nll, 0.0)) / jnp.maximum(num_maskable, 1)
  # the removed [MASK] logit is -inf: 0 * -inf would be NaN (and a where() after it still NaNs the gradient)
  finite = jnp.where(jnp.isfinite(log_probs), log_probs, 0.0)
  entropy = -jnp.sum(jnp.exp(log_probs) * finite, axis=-1)
  right = noise.masked & (jnp.argmax(log_probs, axis=-1) == targets)
  certainty = jnp.sum(jnp.where(right, entropy, 0.0)) / jnp.maximum(jnp.sum(right), 1)
  return ce, certainty


def distill_loss(params, batch, rng, *, model, cfg: base.ObjectiveConfig, certainty_weight: float):
  """``(loss, metrics)`` of the student on one batch of teacher samples (module docstring)."""
  if cfg.kind != "block_diffusion":
    raise ValueError(f"confidence distillation fine-tunes a block-diffusion student; objective.kind={cfg.kind!r}.")
  pb = base.prepare_batch(batch)
  cfg.check_seq_len(pb.tokens.shape[1])
  maskable = diffusion.maskable_tokens(pb, cfg)
  noise, _ = diffusion.sample_noise_t(rng, maskable, cfg)
  logits = diffusion.diffusion_logits(params, pb, noise.masked, model=model, cfg=cfg)
  ce, certainty = distill_terms(base.log_probs(logits, model.config.mask_token_id), pb.tokens, noise,
                                jnp.sum(maskable))
  loss = ce + certainty_weight * certainty
  return loss, {"loss": loss, "ce": ce, "certainty": certainty}


def finetune(params, model, cfg: base.ObjectiveConfig, data: TeacherData, *, steps: int, batch_size: int,
             learning_rate: float = 3e-4, certainty_weight: float = 0.5, seed: int = 0):
  """``(params, history)`` after ``steps`` AdamW steps on minibatches of ``data`` drawn in a seeded order;
  ``history`` holds each step's metrics (floats)."""
  n = data.tokens.shape[0]
  if not 1 <= batch_size <= n:
    raise ValueError(f"batch_size={batch_size} must lie in [1, {n}] (the number of teacher samples).")
  opt = optax.adamw(learning_rate, weight_decay=0.0)
  loss_fn = functools.partial(distill_loss, model=model, cfg=cfg, certainty_weight=certainty_weight)

  @jax.jit
  def step(p, opt_state, batch, key):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, key)
    updates, opt_state = opt.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, metrics

  order = np.random.default_rng(seed)
  key = jax.random.key(seed)
  opt_state = opt.init(params)
  history = []
  for _ in range(steps):
    idx = order.choice(n, batch_size, replace=False)
    batch = {"tokens": data.tokens[idx], "segment_ids": data.segment_ids[idx], "loss_mask": data.loss_mask[idx]}
    key, sub = jax.random.split(key)
    params, opt_state, metrics = step(params, opt_state, batch, sub)
    history.append({k: float(v) for k, v in metrics.items()})
  return params, history
