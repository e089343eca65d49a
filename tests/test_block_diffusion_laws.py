"""Statistical laws of the block-diffusion sampler's stochastic strategies, end to end through the cached sampler.

``first_hitting`` with k = 1 (BD3's exact sampler) picks a masked position uniformly and draws its token from that
position's processed distribution given the current, partially unmasked block; ``ddpm_cache`` unmasks each masked
position independently w.p. ``(t - s) / t`` with its token from the same conditional. Both laws are enumerated
exactly for one block of a tiny model (5 real tokens + [MASK], B = 3): every partial state of the block is forwarded
uncached, and a dynamic program over states gives the joint law of the generated positions. The sampler's empirical
joint (two prompts of different lengths in ONE ragged batch) is compared by chi-square; [MASK] must never appear.
A negative control (the first-hitting samples against a left-to-right law) must be rejected by the same test.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ardiff import masks as masks_lib
from ardiff.config import ModelConfig
from ardiff.model import Transformer, init_params
from ardiff.sampling import common, sample_block_diffusion

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py
REAL, MASK = 5, 5
CFG = ModelConfig(vocab_size=6, embed_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
                  mask_token_id=MASK, init_std=0.7, scan_layers=False)
BS = 3
N = 4000  # samples per prompt
ALPHA, P_FAIL = 1e-4, 1e-9
WIDTH = 9  # uncached forwards: whole prompt blocks (<= 6) + one block, one static shape


@pytest.fixture(scope="module")
def setup():
  return Transformer(CFG), init_params(CFG, jax.random.PRNGKey(4))


def _chi2(samples, probs):
  """Pearson chi-square p-value of categorical ``samples`` against ``probs`` (flat), pooling cells with expected < 5.
  A sample of a zero-probability outcome is an immediate failure."""
  probs = np.asarray(probs, np.float64).ravel()
  probs = probs / probs.sum()
  counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
  assert len(counts) == len(probs) and counts[probs == 0].sum() == 0, "sampled a zero-probability outcome"
  exp = probs * len(samples)
  big = exp >= 5
  obs_c, exp_c = np.append(counts[big], counts[~big].sum()), np.append(exp[big], exp[~big].sum())
  keep = exp_c > 0
  stat = np.sum((obs_c[keep] - exp_c[keep]) ** 2 / exp_c[keep])
  return float(stats.chi2.sf(stat, max(keep.sum() - 1, 1)))


def _conditionals(model, params, prompt, *, token_shift, temperature, top_k, top_p):
  """``{state: probs [B, V]}``: the processed distribution of every block position, for every partial state of the
  row's first generated block (a state is a B-tuple, [MASK] where unknown; the prompt's tail is fixed)."""
  aligned = len(prompt) // BS * BS
  tail = list(prompt[aligned:])
  states = [tuple(tail) + rest for rest in itertools.product(range(REAL + 1), repeat=BS - len(tail))]
  seqs = np.zeros((len(states), WIDTH), np.int32)  # trailing padding is invisible under BlockCausal
  for i, st in enumerate(states):
    seqs[i, :aligned + BS] = list(prompt[:aligned]) + list(st)
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t, mask=masks_lib.BlockCausal(BS)).logits)
  logits = np.asarray(fwd(params, jnp.asarray(seqs)))
  rows = np.arange(aligned, aligned + BS) - (1 if token_shift else 0)
  block = jnp.asarray(logits[:, np.maximum(rows, 0)])  # a shifted row -1 is a prompt position: never sampled
  if top_p < 1.0:  # the nucleus must not sit on a rounding edge (cached and uncached logits differ by ~1e-6)
    unfiltered = np.asarray(jax.nn.softmax(common.process_logits(block, mask_token_id=MASK, temperature=temperature,
                                                                 top_k=top_k), -1))
    srt = -np.sort(-unfiltered, -1)[np.array(states) == MASK]  # only the positions a state samples
    margin = np.abs(np.cumsum(srt, -1) - srt - top_p).min()
    assert margin > 1e-3, f"top_p={top_p} is within {margin:.1e} of a nucleus edge; pick another value"
  probs = np.asarray(jax.nn.softmax(common.process_logits(block, mask_token_id=MASK, temperature=temperature,
                                                          top_k=top_k, top_p=top_p), -1), np.float64)
  assert probs[..., MASK].max() == 0
  return dict(zip(states, probs / probs.sum(-1, keepdims=True)))  # float64 sums of 1, for the law's check


def _unknown(state):
  return [j for j, v in enumerate(state) if v == MASK]


def _law(cond, prompt, rule, steps=None):
  """Exact joint law ``[REAL] * u`` of the block's ``u`` generated positions under ``rule``:
  'first_hitting' (uniform masked position, token from its conditional), 'left_to_right' (the leftmost masked
  position; a wrong law for the negative control) or 'ddpm_cache' (``steps`` time steps; at step i each masked
  position unmasks independently w.p. 1 / (steps - i))."""
  aligned = len(prompt) // BS * BS
  start = tuple(prompt[aligned:]) + (MASK,) * (BS - len(prompt) + aligned)
  dist = {start: 1.0}
  for i in range(steps if rule == "ddpm_cache" else len(_unknown(start))):
    new = {}
    for st, w in dist.items():
      masked, p = _unknown(st), cond[st]
      if rule == "ddpm_cache":
        q = 1.0 / max(steps - i, 1)
        for pattern in itertools.product([False, True], repeat=len(masked)):
          chosen = [j for j, c in zip(masked, pattern) if c]
          w_pat = w * q ** len(chosen) * (1 - q) ** (len(masked) - len(chosen))
          if w_pat == 0:  # q = 1 at the last step: every masked position unmasks
            continue
          for vals in itertools.product(range(REAL), repeat=len(chosen)):
            nxt = list(st)
            wv = w_pat
            for j, v in zip(chosen, vals):
              nxt[j], wv = v, wv * p[j, v]
            new[tuple(nxt)] = new.get(tuple(nxt), 0.0) + wv
      else:
        for j in (masked if rule == "first_hitting" else masked[:1]):
          for v in range(REAL):
            nxt = st[:j] + (v,) + st[j + 1:]
            new[nxt] = new.get(nxt, 0.0) + w / (len(masked) if rule == "first_hitting" else 1) * p[j, v]
    dist = new
  u = len(_unknown(start))
  joint = np.zeros([REAL] * u)
  for st, w in dist.items():
    assert not _unknown(st)
    joint[st[BS - u:]] += w
  np.testing.assert_allclose(joint.sum(), 1.0, rtol=1e-9)
  return joint


def _sample(model, params, prompts, **kw):
  """N rows of each prompt, interleaved in one ragged batch; returns each prompt's generated positions [N, u]."""
  width = max(len(p) for p in prompts)
  rows = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    rows[i, :len(p)] = p
  lens = np.array([len(p) for p in prompts], np.int32)
  res = sample_block_diffusion(params, model, np.tile(rows, (N, 1)), np.tile(lens, N), rng=jax.random.PRNGKey(7),
                               block_size=BS, num_blocks=1, **kw)
  raw = np.asarray(res.raw_blocks)
  assert (raw != MASK).all()  # [MASK] is never committed
  return [raw[g::len(prompts), len(p) % BS:] for g, p in enumerate(prompts)]


CASES = [  # prompts (one ragged batch), sampler options; the law's rule
    (([2, 0, 3], [1, 4, 4, 0, 2, 1]), dict(strategy="first_hitting", temperature=1.0, kv_write="separate")),
    (([2, 0, 3, 1], [4, 1, 3]), dict(strategy="first_hitting", temperature=0.7, top_k=3, top_p=0.9,
                                     token_shift=True)),
    (([2, 0, 3], [1, 4, 4, 0]), dict(strategy="ddpm_cache", steps_per_block=2, temperature=1.0)),
]


@pytest.mark.parametrize("prompts,kw", CASES)
def test_block_law(setup, prompts, kw):
  model, params = setup
  prompts = [np.asarray(p, np.int32) for p in prompts]
  samples = _sample(model, params, prompts, **kw)
  pvals, wrong_pvals = {}, []
  for g, (prompt, tok) in enumerate(zip(prompts, samples)):
    cond = _conditionals(model, params, prompt, token_shift=kw.get("token_shift", False),
                         temperature=kw["temperature"], top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0))
    joint = _law(cond, prompt, kw["strategy"], kw.get("steps_per_block"))
    pvals[g, "joint"] = _chi2(np.ravel_multi_index(tuple(tok.T), joint.shape), joint)
    for j in range(tok.shape[1]):
      pvals[g, j] = _chi2(tok[:, j], joint.sum(axis=tuple(a for a in range(joint.ndim) if a != j)))
    if kw["strategy"] == "first_hitting" and "top_k" not in kw:  # negative control: a left-to-right order
      wrong = _law(cond, prompt, "left_to_right")
      wrong_pvals.append(_chi2(np.ravel_multi_index(tuple(tok.T), wrong.shape), wrong))
  assert not wrong_pvals or min(wrong_pvals) < P_FAIL, ("the test cannot tell a wrong order", wrong_pvals)
  worst = min(pvals, key=pvals.get)
  assert pvals[worst] > ALPHA / len(pvals), (worst, pvals[worst], pvals)
