"""TiDAR draft+verify and speculative decoding: greedy == greedy AR, exactness of the sampled distribution (with a
negative control that must fail), and cached step logits == uncached forwards (docs/algorithms.md §5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ardiff import masks as masks_lib
from ardiff.config import ModelConfig
from ardiff.model import Transformer, init_params
from ardiff.sampling import common, prefill, sample_ar
from ardiff.sampling.speculative import sample_speculative
from ardiff.sampling.tidar import TiDARDecodeMask, decode_inputs, sample_tidar

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py
VOCAB, MASK = 8, 7
CFG = ModelConfig(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  mask_token_id=MASK, init_std=0.5, scan_layers=False)
DCFG = CFG.replace(num_layers=1, init_std=0.4)
N_SAMPLES = 4000
PROMPT = np.array([3, 1, 4], np.int32)
P_OK, P_FAIL = 1e-3, 1e-6  # exact rule must pass p > P_OK; wrong rules must give p < P_FAIL


@pytest.fixture(scope="module")
def models():
  model, draft = Transformer(CFG), Transformer(DCFG)
  return model, init_params(CFG, jax.random.PRNGKey(0)), draft, init_params(DCFG, jax.random.PRNGKey(7))


@functools.partial(jax.jit, static_argnames=("model", "mask"))
def _fwd(params, tokens, positions=None, *, model, mask):
  return model.apply({"params": params}, tokens, positions=positions, mask=mask).logits


def _ragged(lengths, width, seed=1):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(0, MASK, size=(len(lengths), width)).astype(np.int32)
  for r, n in enumerate(lengths):
    prompt[r, n:] = 0
  return prompt, np.asarray(lengths, np.int32)


# ----------------------------------------------------------------------------------------------- greedy == AR


def test_greedy_speculative_equals_greedy_ar(models):
  model, params, draft, dparams = models
  prompt, lens = _ragged([5, 2, 3, 6], 6)
  ar = sample_ar(params, model, prompt, lens, rng=jax.random.PRNGKey(0), max_new_tokens=24, greedy=True)
  for k in (1, 3):
    sp = sample_speculative(params, model, dparams, draft, prompt, lens, rng=jax.random.PRNGKey(1),
                            max_new_tokens=24, num_draft=k, greedy=True)
    np.testing.assert_array_equal(np.asarray(sp.tokens), np.asarray(ar.tokens))
    assert int(sp.nfe) <= 24 and int(sp.draft_nfe) == 1 + k * int(sp.steps)
  # Drafter == target: every draft is accepted, k+1 tokens per target forward.
  sp = sample_speculative(params, model, params, model, prompt, lens, rng=jax.random.PRNGKey(1), max_new_tokens=24,
                          num_draft=3, greedy=True)
  np.testing.assert_array_equal(np.asarray(sp.tokens), np.asarray(ar.tokens))
  assert int(sp.nfe) == 1 + 6  # prefill + ceil(23 / 4)


def test_greedy_tidar_equals_greedy_ar(models):
  model, params, _, _ = models
  prompt, lens = _ragged([5, 2, 3, 6], 6)
  ar = sample_ar(params, model, prompt, lens, rng=jax.random.PRNGKey(0), max_new_tokens=24, greedy=True)
  for bs in (2, 4):
    td = sample_tidar(params, model, prompt, lens, rng=jax.random.PRNGKey(1), max_new_tokens=24, block_size=bs,
                      greedy=True)
    np.testing.assert_array_equal(np.asarray(td.tokens), np.asarray(ar.tokens))
    assert int(td.nfe) == 2 + int(td.steps)


def test_eos_and_pad(models):
  model, params, draft, dparams = models
  prompt, lens = _ragged([5, 2, 3, 6], 6)
  ar = sample_ar(params, model, prompt, lens, rng=jax.random.PRNGKey(0), max_new_tokens=16, greedy=True, eos_id=3,
                 pad_id=6)
  td = sample_tidar(params, model, prompt, lens, rng=jax.random.PRNGKey(1), max_new_tokens=16, greedy=True, eos_id=3,
                    pad_id=6)
  sp = sample_speculative(params, model, dparams, draft, prompt, lens, rng=jax.random.PRNGKey(1), max_new_tokens=16,
                          greedy=True, eos_id=3, pad_id=6)
  for res in (td, sp):
    np.testing.assert_array_equal(np.asarray(res.tokens), np.asarray(ar.tokens))
    np.testing.assert_array_equal(np.asarray(res.lengths), np.asarray(ar.lengths))
    np.testing.assert_array_equal(np.asarray(res.done), np.asarray(ar.done))


# ----------------------------------------------------------------------------------------- cached == uncached


def test_tidar_step_logits_match_uncached(models):
  """Every row of one cached TiDAR step (ragged cache lengths) == an uncached forward of the sequence it should see:
  AR rows = causal over prompt + y + d; block j = [prompt, y, d_1..d_j] causal + the block bidirectional on top."""
  model, params, _, _ = models
  bs = 3
  prompt, lens = _ragged([4, 2], 4)
  cache, _ = prefill(params, model, jnp.asarray(prompt), jnp.asarray(lens), 4 + bs + bs * bs, masks_lib.Causal())
  rng = np.random.default_rng(0)
  y = rng.integers(0, MASK, size=(2,)).astype(np.int32)
  drafts = rng.integers(0, MASK, size=(2, bs - 1)).astype(np.int32)
  tokens, positions = decode_inputs(jnp.asarray(y), jnp.asarray(drafts), cache.lengths, bs, MASK)
  out = model.apply({"params": params}, tokens, positions=positions, cache=cache,
                    mask=TiDARDecodeMask(bs, bs, cache.lengths[:, None, None]))
  got = np.asarray(out.logits)
  for r in range(2):
    ctx = np.concatenate([prompt[r, :lens[r]], y[r:r + 1], drafts[r]])
    full = _fwd(params, jnp.asarray(ctx)[None], model=model, mask=masks_lib.Causal())[0]
    np.testing.assert_allclose(got[r, :bs], np.asarray(full)[lens[r]:], atol=2e-5)
    for j in range(bs):
      pre = ctx[:lens[r] + 1 + j]
      n = len(pre)
      seq = np.concatenate([pre, np.full(bs, MASK, np.int32)])
      allowed = np.tril(np.ones((n + bs, n + bs), bool))
      allowed[n:, :] = True  # the block sees the whole prefix and itself (bidirectional)
      pos = np.concatenate([np.arange(n), n + np.arange(bs)])  # block predicts the bs positions after its prefix
      ref = _fwd(params, jnp.asarray(seq)[None], jnp.asarray(pos)[None], model=model,
                 mask=masks_lib.Explicit(allowed))[0, n:]
      np.testing.assert_allclose(got[r, bs + j * bs: bs + (j + 1) * bs], np.asarray(ref), atol=2e-5)


# ------------------------------------------------------------------------------------ exactness (sampling)


_EXACT = {}


def _exact_ar_probs(model, params, temperature=1.0, top_k=0):
  key = (temperature, top_k)
  if key not in _EXACT:
    _EXACT[key] = _exact_ar_probs_uncached(model, params, temperature, top_k)
  return _EXACT[key]


def _exact_ar_probs_uncached(model, params, temperature, top_k):
  """p(t1), p(t2 | t1), p(t3 | t1, t2) of the model's processed AR distribution after PROMPT: [V], [V,V], [V,V,V]."""
  proc = lambda lg: jax.nn.softmax(common.process_logits(lg, mask_token_id=MASK, temperature=temperature,
                                                         top_k=top_k), -1)
  fwd = lambda seqs: _fwd(params, jnp.asarray(seqs), model=model, mask=masks_lib.Causal())
  p1 = np.asarray(proc(fwd(PROMPT[None])[0, -1]))
  v = np.arange(VOCAB)
  s2 = np.concatenate([np.tile(PROMPT, (VOCAB, 1)), v[:, None]], 1)
  p2 = np.asarray(proc(fwd(s2)[:, -1]))
  s3 = np.concatenate([np.tile(PROMPT, (VOCAB * VOCAB, 1)), np.repeat(v, VOCAB)[:, None], np.tile(v, VOCAB)[:, None]],
                      1)
  p3 = np.asarray(proc(fwd(s3)[:, -1])).reshape(VOCAB, VOCAB, VOCAB)
  return p1.astype(np.float64), p2.astype(np.float64), p3.astype(np.float64)


def _chi2(samples, probs):
  """Pearson chi-square of categorical ``samples`` (ints) against ``probs`` (flat), pooling cells with expected < 5.
  Returns (p-value, total variation distance)."""
  probs = probs.ravel() / probs.sum()
  n = len(samples)
  counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
  assert counts[probs == 0].sum() == 0, "sampled a zero-probability outcome"
  exp = probs * n
  big = exp >= 5
  obs_c = np.append(counts[big], counts[~big].sum())
  exp_c = np.append(exp[big], exp[~big].sum())
  keep = exp_c > 0
  stat = np.sum((obs_c[keep] - exp_c[keep]) ** 2 / exp_c[keep])
  return float(stats.chi2.sf(stat, keep.sum() - 1)), float(0.5 * np.abs(counts / n - probs).sum())


def _check_distribution(tokens, p1, p2, p3):
  """Joint of the first two emitted tokens, and the marginal of the third. Returns the smallest p-value + TVs."""
  t = np.asarray(tokens)
  joint12 = p1[:, None] * p2
  p_joint, tv_joint = _chi2(t[:, 0] * VOCAB + t[:, 1], joint12)
  marg3 = np.einsum("ab,abc->c", joint12, p3)
  p_3, tv_3 = _chi2(t[:, 2], marg3)
  return min(p_joint, p_3), dict(p_joint12=p_joint, tv_joint12=tv_joint, p_marg3=p_3, tv_marg3=tv_3)


def _rows():
  return np.tile(PROMPT, (N_SAMPLES, 1)), np.full(N_SAMPLES, len(PROMPT), np.int32)


_REPORT = {}


@pytest.mark.parametrize("rule", ["exact", "always_accept", "resample_p"])
def test_speculative_distribution_exact_and_negative_control(models, rule):
  model, params, draft, dparams = models
  p1, p2, p3 = _exact_ar_probs(model, params)
  prompt, lens = _rows()
  res = sample_speculative(params, model, dparams, draft, prompt, lens, rng=jax.random.PRNGKey(123),
                           max_new_tokens=3, num_draft=2, temperature=1.0, accept_rule=rule)
  pval, info = _check_distribution(res.tokens, p1, p2, p3)
  _REPORT[("speculative", rule)] = info
  print(f"speculative {rule}: {info}, accepted/row {float(np.mean(res.accepted)):.2f}")
  if rule == "exact":
    assert pval > P_OK, info
  else:
    assert pval < P_FAIL, info  # the test has power: a biased acceptance rule is detected


@pytest.mark.parametrize("rule", ["exact", "always_accept", "resample_p"])
def test_tidar_distribution_exact_and_negative_control(models, rule):
  """TiDAR's first token comes straight from the prefill; tokens 2 and 3 cross the accept/reject boundaries."""
  model, params, _, _ = models
  p1, p2, p3 = _exact_ar_probs(model, params)
  prompt, lens = _rows()
  res = sample_tidar(params, model, prompt, lens, rng=jax.random.PRNGKey(321), max_new_tokens=3, block_size=3,
                     temperature=1.0, accept_rule=rule)
  pval, info = _check_distribution(res.tokens, p1, p2, p3)
  _REPORT[("tidar", rule)] = info
  print(f"tidar {rule}: {info}, accepted/row {float(np.mean(res.accepted)):.2f}")
  if rule == "exact":
    assert pval > P_OK, info
  else:
    assert pval < P_FAIL, info


def test_exactness_with_temperature_and_top_k(models):
  """q and p must be the *processed* distributions: temperature 0.7 and top-k 4 on both samplers."""
  model, params, draft, dparams = models
  p1, p2, p3 = _exact_ar_probs(model, params, temperature=0.7, top_k=4)
  prompt, lens = _rows()
  sp = sample_speculative(params, model, dparams, draft, prompt, lens, rng=jax.random.PRNGKey(5), max_new_tokens=3,
                          num_draft=2, temperature=0.7, top_k=4)
  td = sample_tidar(params, model, prompt, lens, rng=jax.random.PRNGKey(6), max_new_tokens=3, block_size=3,
                    temperature=0.7, top_k=4)
  for name, res in (("speculative", sp), ("tidar", td)):
    pval, info = _check_distribution(res.tokens, p1, p2, p3)
    print(f"{name} T=0.7 top_k=4: {info}")
    assert pval > P_OK, (name, info)
