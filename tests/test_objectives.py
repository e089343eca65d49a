"""Tests that pin the math of the objectives (issue: core library, section 5)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks, objectives
from ardiff.config import ModelConfig
from ardiff.model import Transformer, init_params
from ardiff.objectives import base, diffusion, schedules

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py

V, MASK = 32, 31
CFG = ModelConfig(vocab_size=V, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  mask_token_id=MASK)
MODEL = Transformer(CFG)
PARAMS = init_params(CFG, jax.random.key(0))


def tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, MASK)


@pytest.mark.parametrize("mask_id", [10, None])
def test_token_nll_equals_gather_of_log_probs_values_and_grads(mask_id):
  """The losses' logsumexp-minus-target-logit form = gathering :func:`base.log_probs`, [MASK] logit removed."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 7, 11)) * 4, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 10, (3, 7)), jnp.int32)  # 10 = MASK below is never a target here
  ref = jax.jit(lambda x: base.gather_nll(base.log_probs(x, mask_id), targets))
  new = jax.jit(lambda x: base.token_nll(x, targets, mask_id))
  np.testing.assert_allclose(new(logits), ref(logits), rtol=1e-6, atol=1e-6)
  weights = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
  g_ref = jax.jit(jax.grad(lambda x: jnp.sum(weights * ref(x))))(logits)
  g_new = jax.jit(jax.grad(lambda x: jnp.sum(weights * new(x))))(logits)
  np.testing.assert_allclose(g_new, g_ref, rtol=1e-6, atol=1e-7)
  if mask_id is not None:
    assert float(jnp.max(jnp.abs(g_new[..., mask_id]))) == 0.0  # the removed logit gets no gradient
    assert np.isinf(float(base.token_nll(logits, jnp.full_like(targets, mask_id), mask_id)[0, 0]))


def test_bd3_block_size_one_all_masked_equals_ar_loss():
  x = tokens((3, 16))
  ar_loss, _ = jax.jit(objectives.make_loss_fn(MODEL, objectives.ObjectiveConfig(kind="ar")))(
      PARAMS, {"tokens": x}, None)
  cfg = objectives.ObjectiveConfig(block_size=1, clip_low=1.0, clip_high=1.0, token_shift=True)
  bd3_loss, metrics = jax.jit(objectives.make_loss_fn(MODEL, cfg))(PARAMS, {"tokens": x}, jax.random.key(3))
  assert float(metrics["mask_rate"]) == 1.0
  np.testing.assert_allclose(float(bd3_loss), float(ar_loss), atol=1e-6, rtol=0)


def test_bd3_block_size_one_without_shift_is_the_masked_query_ar_model():
  """No token shift: row i holds [MASK] at position i and sees clean x_<i. Recompute that one position at a time."""
  x = tokens((2, 8))
  cfg = objectives.ObjectiveConfig(block_size=1, clip_low=1.0, clip_high=1.0)
  loss, _ = jax.jit(objectives.make_loss_fn(MODEL, cfg))(PARAMS, {"tokens": x}, jax.random.key(3))
  # Causal: position i's logits see only inputs 0..i, so each one-position input keeps length 8 (one compile)
  # with the tokens after i left in place.
  apply = jax.jit(lambda inp: MODEL.apply({"params": PARAMS}, inp, mask=masks.Causal()).logits)
  total = 0.0
  for i in range(1, 8):
    logits = apply(x.at[:, i].set(MASK))[:, i]
    total += float(jnp.sum(base.gather_nll(base.log_probs(logits[:, None], MASK), x[:, i:i + 1])))
  np.testing.assert_allclose(float(loss), total / (2 * 7), atol=1e-6, rtol=0)


def test_bd3_block_size_length_equals_mdlm_bidirectional_1l():
  x = tokens((2, 12))
  cfg = objectives.ObjectiveConfig(block_size=12)
  pb = base.prepare_batch({"tokens": x})
  noise, _ = diffusion.sample_noise_t(jax.random.key(5), diffusion.maskable_tokens(pb, cfg), cfg)
  assert bool(jnp.any(noise.masked))
  terms = jax.jit(lambda pb, noise, two: diffusion.nll_terms(PARAMS, pb, noise, model=MODEL, cfg=cfg,
                                                               force_two_stream=two), static_argnums=2)
  two_stream = terms(pb, noise, True)
  x_t = jnp.where(noise.masked, MASK, x)
  logits = jax.jit(lambda x_t: MODEL.apply({"params": PARAMS}, x_t, mask=masks.Full()).logits)(x_t)
  nll = base.gather_nll(base.log_probs(logits, MASK), x)
  want = jnp.sum(jnp.where(noise.masked, noise.weight * nll, 0.0))
  np.testing.assert_allclose(float(two_stream[0]), float(want), rtol=1e-6)
  one_stream = terms(pb, noise, False)  # the fast path used in training
  np.testing.assert_allclose(float(one_stream[0]), float(want), rtol=1e-6)


def test_clean_half_hidden_states_equal_block_causal_forward():
  x, x_t = tokens((2, 16)), tokens((2, 16), seed=9)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  out2 = MODEL.apply({"params": PARAMS}, jnp.concatenate([x_t, x], 1), mask=masks.BD3(16, 4),
                     positions=jnp.concatenate([pos, pos], 1))
  out1 = MODEL.apply({"params": PARAMS}, x, mask=masks.BlockCausal(4))
  np.testing.assert_allclose(np.asarray(out2.hidden[:, 16:]), np.asarray(out1.hidden), atol=1e-5, rtol=0)


def test_noisy_block_depends_only_on_itself_and_earlier_clean_blocks():
  n, bs, blk = 16, 4, 2
  x, x_t = tokens((1, n)), tokens((1, n), seed=4)
  pos = jnp.arange(n)[None]
  fwd = lambda xt, x0: MODEL.apply({"params": PARAMS}, jnp.concatenate([xt, x0], 1), mask=masks.BD3(n, bs),
                                   positions=jnp.concatenate([pos, pos], 1)).logits[:, blk * bs:(blk + 1) * bs]
  ref = fwd(x_t, x)
  other = lambda arr, sl: arr.at[:, sl].set((arr[:, sl] + 7) % MASK)
  # Perturb what block 2 must NOT see: other noisy blocks, clean blocks >= 2. No change.
  for xt, x0 in ((other(x_t, slice(0, 8)), x), (other(x_t, slice(12, 16)), x), (x_t, other(x, slice(8, 16)))):
    np.testing.assert_array_equal(np.asarray(fwd(xt, x0)), np.asarray(ref))
  # Perturb what it must see: its own noisy block, earlier clean blocks. Changes.
  for xt, x0 in ((other(x_t, slice(8, 12)), x), (x_t, other(x, slice(0, 4))), (x_t, other(x, slice(4, 8)))):
    assert float(jnp.max(jnp.abs(fwd(xt, x0) - ref))) > 1e-4


def pack(docs, length, block_size):
  """Block-aligned packing of documents into one row (what the data pipeline does for block diffusion)."""
  tok, seg, pos = np.zeros(length, np.int32), np.zeros(length, np.int32), np.zeros(length, np.int32)
  at = 0
  for i, d in enumerate(docs):
    tok[at:at + len(d)], seg[at:at + len(d)], pos[at:at + len(d)] = d, i + 1, np.arange(len(d))
    at += -(-len(d) // block_size) * block_size
  return {"tokens": tok[None], "segment_ids": seg[None], "positions": pos[None]}


@pytest.mark.parametrize("kind", ["ar", "block_diffusion", "tidar"])
def test_packed_loss_equals_unpacked_per_document(kind):
  bs = 4
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, MASK, n) for n in (8, 5, 11)]
  cfg = objectives.ObjectiveConfig(kind=kind, block_size=bs)
  packed = pack(docs, 28, bs)

  def per_doc_sums(batch, draw):
    pb = base.prepare_batch(batch)
    if kind == "ar":
      out = MODEL.apply({"params": PARAMS}, pb.tokens, mask=masks.Causal(), positions=pb.positions,
                        segment_ids=pb.segment_ids)
      nll = base.gather_nll(base.log_probs(out.logits[:, :-1], MASK), pb.tokens[:, 1:])
      valid = pb.loss_mask[:, 1:] & ~base.document_starts(pb.segment_ids)[:, 1:]
      return nll * valid, pb.segment_ids[:, 1:]
    if kind == "tidar":
      n = pb.tokens.shape[1]
      out = MODEL.apply({"params": PARAMS}, jnp.concatenate([pb.tokens, jnp.full_like(pb.tokens, MASK)], 1),
                        mask=masks.TiDARTrain(n, bs), positions=jnp.concatenate([pb.positions] * 2, 1),
                        segment_ids=jnp.concatenate([pb.segment_ids] * 2, 1))
      nll = base.gather_nll(base.log_probs(out.logits[:, n:], MASK), pb.tokens)
      return nll * diffusion.maskable_tokens(pb, cfg), pb.segment_ids
    noise = diffusion.Noise(draw(pb), jnp.ones(pb.tokens.shape))
    _, _, _, weighted = diffusion.nll_terms(PARAMS, pb, noise, model=MODEL, cfg=cfg)
    return weighted, pb.segment_ids

  # The same masked positions in both layouts: mask every other maskable token of each document.
  def draw_packed(pb):
    return diffusion.maskable_tokens(pb, cfg) & (pb.positions % 2 == 1)

  per_doc_sums = jax.jit(per_doc_sums, static_argnums=1)  # eager, the model's ops ran one by one (~3 min)

  contrib, seg = per_doc_sums(packed, draw_packed)
  for i, d in enumerate(docs):
    single = pack([d], -(-len(d) // bs) * bs, bs)
    c1, _ = per_doc_sums(single, draw_packed)
    np.testing.assert_allclose(float(jnp.sum(jnp.where(seg == i + 1, contrib, 0.0))), float(jnp.sum(c1)),
                               rtol=2e-6, atol=1e-6)


def test_count_estimator_is_the_exact_continuous_time_nelbo():
  """E_k[(m/k) sum_S CE] equals the integral of (1/t) E[sum_masked CE] dt for an additive toy 'model'."""
  m, ce = 6, np.arange(1.0, 7.0)  # CE of token l when masked, independent of the rest
  # Integral: E[sum_masked CE] = t * sum(ce), so the integrand is sum(ce) for every t and the integral is sum(ce).
  maskable = jnp.ones((4000, m), bool)
  noise = jax.jit(lambda r: diffusion.sample_noise_count(r, maskable, m))(jax.random.key(0))
  est = np.asarray(jnp.sum(jnp.where(noise.masked, noise.weight * ce, 0.0), axis=1))
  assert abs(est.mean() - ce.sum()) < 4 * est.std() / np.sqrt(len(est))
  k = np.asarray(noise.masked.sum(1))
  assert k.min() == 1 and k.max() == m  # every count in 1..m is drawn


def test_token_shift_and_complementary_masks_run_and_cover():
  x = tokens((2, 16))
  cfg = objectives.ObjectiveConfig(block_size=4, token_shift=True, complementary_masks=True, weighting="none")
  loss, metrics = jax.jit(objectives.make_loss_fn(MODEL, cfg))(PARAMS, {"tokens": x}, jax.random.key(1))
  assert np.isfinite(float(loss))
  assert float(metrics["mask_rate"]) == pytest.approx(0.5)  # two complementary views: each token masked once


def test_sft_prompt_and_bos_are_never_noised():
  x = tokens((64, 12))
  loss_mask = jnp.broadcast_to(jnp.arange(12) >= 5, (64, 12))  # first 5 tokens are the prompt
  pb = base.prepare_batch({"tokens": x, "loss_mask": loss_mask})
  cfg = objectives.ObjectiveConfig(block_size=4)
  noise, _ = diffusion.sample_noise_t(jax.random.key(0), diffusion.maskable_tokens(pb, cfg), cfg)
  assert not bool(jnp.any(noise.masked[:, :5]))
  assert bool(jnp.any(noise.masked[:, 5:]))
  pb2 = base.prepare_batch({"tokens": x})
  noise2, _ = diffusion.sample_noise_t(jax.random.key(0), diffusion.maskable_tokens(pb2, cfg), cfg)
  assert not bool(jnp.any(noise2.masked[:, 0]))  # BOS


def test_antithetic_t_and_clip_interval():
  t = schedules.sample_block_t(jax.random.key(0), 8, 4, low=0.3, high=0.8)
  t = np.sort(np.asarray(t).ravel())
  assert t.min() >= 0.3 and t.max() <= 0.8
  np.testing.assert_allclose(np.diff(t), 0.5 / 32, atol=1e-5)  # evenly spread
  cands = schedules.candidate_intervals()
  assert (0.001, 0.5) in cands and all(hi - lo <= 0.9 + 1e-9 for lo, hi in cands)
  best, var = schedules.select_min_variance({(0.1, 0.6): [1.0, 1.1, 0.9], (0.3, 0.8): [1.0, 1.0, 1.01]})
  assert best == (0.3, 0.8) and var[best] < var[(0.1, 0.6)]


def test_eval_nelbo_upper_bounds_and_metrics_are_finite():
  x = tokens((4, 16))
  for kind, key in (("ar", "nll_sum"), ("block_diffusion", "nelbo_sum"), ("tidar", "nll_sum")):
    out = jax.jit(objectives.make_eval_fn(MODEL, objectives.ObjectiveConfig(kind=kind)))(
        PARAMS, {"tokens": x}, jax.random.key(0))
    assert np.isfinite(float(out[key])) and int(out["num_targets"]) > 0


def test_bad_objective_configs_raise():
  with pytest.raises(ValueError, match="block_size=5 must divide"):
    objectives.ObjectiveConfig(block_size=5).check_seq_len(16)
  with pytest.raises(ValueError, match="did you mean 'block_size'"):
    objectives.ObjectiveConfig.from_dict({"blok_size": 4})
  with pytest.raises(ValueError, match="mask_token_id"):
    objectives.make_loss_fn(Transformer(dataclasses.replace(CFG, mask_token_id=None)), objectives.ObjectiveConfig())
  with pytest.raises(ValueError, match="clip"):
    objectives.ObjectiveConfig(clip_low=0.0)
