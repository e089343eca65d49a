"""Statistical laws of the draft+verify samplers: every position they can emit follows the target's AR law.

* ``verify`` alone, on fixed distributions: the correction law, the bonus law (all drafts accepted: from ``p``
  itself, not from ``norm(max(0, p - uniform))``), drafts from a ``q`` with removed entries, ``p == q``, greedy.
* ``sample_ar`` (the reference) on a left-padded batch, so the exact law below is checked against a sampler too.
* End to end: the exact joint law of the first ``T = 5`` generated tokens is enumerated from uncached forwards of a
  tiny model (5 real tokens + [MASK]) for two prompts of different lengths sampled in ONE ragged batch, and compared
  (chi-square) with the sampler's empirical joint of all 5 tokens, the joints of consecutive pairs and the marginal of
  every position. ``T = 5 >= k + 2`` so bonus tokens and the steps after them are covered. Speculative decoding with
  ``num_draft`` 1/2/3 and a drafter equal to the target (bonus every step), TiDAR with block sizes 2/3/4, and
  temperature 0.7 with top-k and top-p. Negative controls (biased acceptance rules) must be rejected by the same test.

Thresholds: an exact sampler passes when the smallest of its ``m`` p-values exceeds ``ALPHA / m`` (Bonferroni,
family-wise false alarm <= ALPHA per configuration; seeds are fixed, so each test is deterministic); a wrong rule
must give a p-value below ``P_FAIL``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ardiff import masks as masks_lib
from ardiff.config import ModelConfig
from ardiff.model import Transformer, init_params
from ardiff.sampling import common, sample_ar
from ardiff.sampling.rejection import residual, verify
from ardiff.sampling.speculative import sample_speculative
from ardiff.sampling.tidar import sample_tidar

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py
VOCAB, MASK = 6, 5
REAL = 5  # tokens 0..4 can be emitted; [MASK] never
CFG = ModelConfig(vocab_size=VOCAB, embed_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
                  mask_token_id=MASK, init_std=0.7, scan_layers=False)
DCFG = CFG.replace(init_std=0.5)
PROMPTS = (np.array([2, 0, 3], np.int32), np.array([1, 4, 4, 0, 2], np.int32))  # ragged: lengths 3 and 5
T = 5  # generated tokens whose joint law is checked
N = 4000  # samples per prompt
ALPHA, P_FAIL = 1e-4, 1e-9


def _chi2(samples, probs):
  """Pearson chi-square p-value of categorical ``samples`` against ``probs`` (flat), pooling cells with expected < 5.
  A sample of a zero-probability outcome is an immediate failure."""
  probs = np.asarray(probs, np.float64).ravel()
  probs = probs / probs.sum()
  n = len(samples)
  counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
  assert len(counts) == len(probs) and counts[probs == 0].sum() == 0, "sampled a zero-probability outcome"
  exp = probs * n
  big = exp >= 5
  obs_c = np.append(counts[big], counts[~big].sum())
  exp_c = np.append(exp[big], exp[~big].sum())
  keep = exp_c > 0
  stat = np.sum((obs_c[keep] - exp_c[keep]) ** 2 / exp_c[keep])
  return float(stats.chi2.sf(stat, max(keep.sum() - 1, 1)))


# ------------------------------------------------------------------------------------------- verify, unit level


def _verify_many(p, q, drafts_fn, n, seed, greedy=False, accept_rule="exact"):
  """Run ``verify`` on ``n`` rows sharing ``p [k+1, V]`` and ``q [k, V]`` (logits); drafts are drawn from ``q``."""
  p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n,) + np.shape(p))
  q = jnp.broadcast_to(jnp.asarray(q, jnp.float32), (n,) + np.shape(q))
  k_d, k_v = jax.random.split(jax.random.PRNGKey(seed))
  drafts = drafts_fn(k_d, q)
  nacc, y = jax.jit(functools.partial(verify, greedy=greedy, accept_rule=accept_rule))(k_v, p, q, drafts)
  return np.asarray(drafts), np.asarray(nacc), np.asarray(y)


def _draw(key, q):
  return common.sample_from_logits(key, q, greedy=False)


def _emitted_position(drafts, nacc, y, j):
  """Tokens emitted at position ``j`` (0-based) by the rows that reach it (``n >= j``)."""
  reach = nacc >= j
  tok = np.where(nacc > j, drafts[:, min(j, drafts.shape[1] - 1)], y)
  return tok[reach]


def test_verify_bonus_is_drawn_from_p():
  """The issue's one-token reproduction: k = 1, q_1 = p_1 (the draft is always accepted), p_2 given; the bonus must
  follow p_2 (the old code drew from norm(max(0, p_2 - 1/V)): frequencies [0.714, 0.286, 0, ...])."""
  p2 = np.array([.5, .3, .1, .05, .03, .02])
  p1 = np.log(np.array([.2, .2, .2, .2, .1, .1]))
  p = np.stack([p1, np.log(p2)])
  drafts, nacc, y = _verify_many(p, p1[None], _draw, 100_000, seed=0)
  assert (nacc == 1).all()  # p == q: u < 1 always accepts
  pval = _chi2(y, p2)
  freq = np.bincount(y, minlength=6) / len(y)
  assert pval > ALPHA, (pval, freq)
  assert freq[2:].min() > 0.01, freq  # tokens with p < 1/V are emitted


@pytest.mark.parametrize("k", [1, 2, 3])
def test_verify_every_position_follows_p(k):
  """Fixed p_1..p_{k+1} and a different q: among the rows reaching position j, the token there follows p_j exactly,
  for the accepted-draft/correction positions and the bonus position. q has removed entries (top-k / [MASK] style
  NEG_INF and -inf) where p > 0, and p has zeros where q > 0."""
  rng = np.random.default_rng(k)
  p = rng.normal(size=(k + 1, 6)) * 1.5
  q = p[:k] + rng.normal(size=(k, 6))  # a drafter close enough to p that all k drafts are often accepted
  q[:, 0] = common.NEG_INF  # drafter never proposes token 0, the target may
  q[0, 1] = -np.inf
  p[:, 5] = common.NEG_INF  # target never emits token 5 ([MASK]-like); the drafter may propose it
  drafts, nacc, y = _verify_many(p, q, _draw, 60_000, seed=k)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(p, jnp.float32), -1), np.float64)
  pvals = [_chi2(_emitted_position(drafts, nacc, y, j), probs[j]) for j in range(k + 1)]
  assert min(pvals) > ALPHA / (k + 1), pvals
  assert (nacc == k).sum() > 1000  # the bonus position was exercised


def test_verify_negative_controls_fail_the_same_check():
  rng = np.random.default_rng(0)
  p, q = rng.normal(size=(3, 6)) * 1.5, rng.normal(size=(2, 6)) * 1.5
  probs = np.asarray(jax.nn.softmax(jnp.asarray(p, jnp.float32), -1), np.float64)
  for rule in ("always_accept", "resample_p"):
    drafts, nacc, y = _verify_many(p, q, _draw, 60_000, seed=1, accept_rule=rule)
    pvals = [_chi2(_emitted_position(drafts, nacc, y, j), probs[j]) for j in range(3)]
    assert min(pvals) < P_FAIL, (rule, pvals)


def test_residual_falls_back_to_p_when_p_equals_q():
  """A rejection when p == q has probability 0; if rounding produces one anyway, the token still comes from p."""
  p = jax.nn.softmax(jnp.asarray([[0.0, 1.0, -2.0, 3.0]]), -1)
  np.testing.assert_array_equal(np.asarray(residual(p, p)), np.asarray(p))
  q = jax.nn.softmax(jnp.asarray([[1.0, 1.0, -2.0, 3.0]]), -1)
  np.testing.assert_allclose(np.asarray(residual(p, q)), np.maximum(np.asarray(p) - np.asarray(q), 0), atol=0)


def test_verify_greedy_and_shapes():
  p = jnp.asarray([[[0., 3, 1], [2, 0, 1], [0, 0, 5]]] * 3)  # argmax: 1, 0, 2
  q = jnp.zeros((3, 2, 3))
  drafts = jnp.asarray([[1, 0], [1, 2], [2, 0]], jnp.int32)
  n, y = verify(jax.random.PRNGKey(0), p, q, drafts, greedy=True)
  np.testing.assert_array_equal(np.asarray(n), [2, 1, 0])
  np.testing.assert_array_equal(np.asarray(y), [2, 0, 1])
  with pytest.raises(ValueError, match=r"p_logits \[b, k\+1, V\]"):
    verify(jax.random.PRNGKey(0), p[:, :2], q, drafts, greedy=False)
  with pytest.raises(ValueError, match="accept_rule must be one of"):
    verify(jax.random.PRNGKey(0), p, q, drafts, greedy=False, accept_rule="bogus")


# ------------------------------------------------------------------------------------ end to end (samplers)


@pytest.fixture(scope="module")
def models():
  model, draft = Transformer(CFG), Transformer(DCFG)
  return model, init_params(CFG, jax.random.PRNGKey(3)), draft, init_params(DCFG, jax.random.PRNGKey(11))


@functools.partial(jax.jit, static_argnames=("model",))
def _last_logits(params, tokens, *, model):
  return model.apply({"params": params}, tokens, mask=masks_lib.Causal()).logits[:, -1]


_LAWS = {}


def _exact_law(model, params, prompt, temperature, top_k, top_p):
  """Exact joint law ``[REAL] * T`` (flattened, first token most significant) of the first ``T`` tokens the model's
  processed AR distribution generates after ``prompt``, by enumerating every context (uncached forwards)."""
  key = (tuple(prompt), temperature, top_k, top_p)
  if key in _LAWS:
    return _LAWS[key]
  joint = np.ones((1,))
  for t in range(T):
    ctx = np.array(np.meshgrid(*[np.arange(REAL)] * t, indexing="ij")).reshape(t, -1).T if t else np.zeros((1, 0))
    seqs = np.concatenate([np.tile(prompt, (len(ctx), 1)), ctx.astype(np.int32)], 1)
    raw = _last_logits(params, jnp.asarray(seqs, jnp.int32), model=model)
    if top_p < 1.0:  # the nucleus must not sit on a rounding edge (cached and uncached logits differ by ~1e-6)
      unfiltered = np.asarray(jax.nn.softmax(common.process_logits(raw, mask_token_id=MASK, temperature=temperature,
                                                                   top_k=top_k), -1))
      srt = -np.sort(-unfiltered, -1)
      margin = np.abs(np.cumsum(srt, -1) - srt - top_p).min()
      assert margin > 1e-4, f"top_p={top_p} is within {margin:.1e} of a nucleus edge; pick another value"
    probs = np.asarray(jax.nn.softmax(common.process_logits(raw, mask_token_id=MASK, temperature=temperature,
                                                            top_k=top_k, top_p=top_p), -1), np.float64)
    assert probs[:, MASK].max() == 0
    joint = (joint[:, None] * probs[:, :REAL]).reshape(-1)
  _LAWS[key] = joint
  return joint


def _batch():
  """N rows of each prompt, interleaved, right-padded to a common width: ``(prompt [2N, P], lengths [2N])``."""
  width = max(len(p) for p in PROMPTS)
  rows = np.zeros((len(PROMPTS), width), np.int32)
  for i, p in enumerate(PROMPTS):
    rows[i, :len(p)] = p
  lens = np.array([len(p) for p in PROMPTS], np.int32)
  return np.tile(rows, (N, 1)), np.tile(lens, N)


def _law_pvalues(tokens, model, params, temperature=1.0, top_k=0, top_p=1.0):
  """p-values of every check for every prompt group: joint of all T tokens, joints of consecutive pairs, marginal of
  each position."""
  tokens = np.asarray(tokens)
  assert tokens.shape[1] == T and tokens.min() >= 0 and tokens.max() < REAL
  pvals = {}
  for g, prompt in enumerate(PROMPTS):
    tok = tokens[g::len(PROMPTS)]
    joint = _exact_law(model, params, prompt, temperature, top_k, top_p).reshape([REAL] * T)
    pvals[g, "joint"] = _chi2(np.ravel_multi_index(tuple(tok.T), joint.shape), joint)
    for j in range(T):
      marg = joint.sum(axis=tuple(a for a in range(T) if a != j))
      pvals[g, j] = _chi2(tok[:, j], marg)
      if j + 1 < T:
        pair = joint.sum(axis=tuple(a for a in range(T) if a not in (j, j + 1)))
        pvals[g, j, j + 1] = _chi2(tok[:, j] * REAL + tok[:, j + 1], pair)
  return pvals


def _assert_exact(pvals, what):
  worst = min(pvals, key=pvals.get)
  assert pvals[worst] > ALPHA / len(pvals), (what, worst, pvals[worst], pvals)


def _assert_rejected(pvals, what):
  assert min(pvals.values()) < P_FAIL, (what, pvals)


def test_ar_law_left_padded(models):
  """The reference sampler itself, on a left-padded ragged batch, at temperature 0.7 with top-k and top-p."""
  model, params, _, _ = models
  prompt, lens = _batch()
  width = prompt.shape[1]
  left = np.stack([np.roll(row, width - n) for row, n in zip(prompt, lens)])
  res = sample_ar(params, model, left, lens, rng=jax.random.PRNGKey(99), max_new_tokens=T, temperature=0.7, top_k=4,
                  top_p=0.6, padding_side="left")
  _assert_exact(_law_pvalues(res.tokens, model, params, 0.7, 4, 0.6), "ar")


SPEC_CASES = [  # (num_draft, temperature, top_k, top_p, drafter == target)
    (1, 1.0, 0, 1.0, False), (2, 1.0, 0, 1.0, False), (3, 1.0, 0, 1.0, False), (2, 1.0, 0, 1.0, True),
    (2, 0.7, 4, 0.6, False)]


@pytest.mark.parametrize("k,temperature,top_k,top_p,same", SPEC_CASES)
def test_speculative_law(models, k, temperature, top_k, top_p, same):
  model, params, draft, dparams = models
  if same:
    draft, dparams = model, params
  prompt, lens = _batch()
  res = sample_speculative(params, model, dparams, draft, prompt, lens, rng=jax.random.PRNGKey(100 + k),
                           max_new_tokens=T, num_draft=k, temperature=temperature, top_k=top_k, top_p=top_p)
  np.testing.assert_array_equal(np.asarray(res.lengths), T)
  if same:  # every draft is accepted (up to cached/uncached rounding): a bonus token closes every step
    steps = int(res.steps)
    assert steps == -(-(T - 1) // (k + 1)) and np.mean(res.accepted) > 0.99 * k * steps, res.accepted
  _assert_exact(_law_pvalues(res.tokens, model, params, temperature, top_k, top_p), ("speculative", k))


@pytest.mark.parametrize("bs,temperature,top_k,top_p", [(2, 1.0, 0, 1.0), (3, 1.0, 0, 1.0), (4, 1.0, 0, 1.0),
                                                         (3, 0.7, 4, 0.6)])
def test_tidar_law(models, bs, temperature, top_k, top_p):
  model, params, _, _ = models
  prompt, lens = _batch()
  res = sample_tidar(params, model, prompt, lens, rng=jax.random.PRNGKey(200 + bs), max_new_tokens=T, block_size=bs,
                     temperature=temperature, top_k=top_k, top_p=top_p)
  np.testing.assert_array_equal(np.asarray(res.lengths), T)
  assert np.mean(np.asarray(res.accepted)) > 0.3  # drafts are accepted often enough to exercise the bonus path
  _assert_exact(_law_pvalues(res.tokens, model, params, temperature, top_k, top_p), ("tidar", bs))


@pytest.mark.parametrize("sampler", ["speculative", "tidar"])
@pytest.mark.parametrize("rule", ["always_accept", "resample_p"])
def test_negative_controls_are_rejected(models, sampler, rule):
  """The same check has power: biased acceptance rules are detected."""
  model, params, draft, dparams = models
  prompt, lens = _batch()
  if sampler == "speculative":
    res = sample_speculative(params, model, dparams, draft, prompt, lens, rng=jax.random.PRNGKey(7),
                             max_new_tokens=T, num_draft=2, accept_rule=rule)
  else:
    res = sample_tidar(params, model, prompt, lens, rng=jax.random.PRNGKey(8), max_new_tokens=T, block_size=3,
                       accept_rule=rule)
  _assert_rejected(_law_pvalues(res.tokens, model, params), (sampler, rule))
