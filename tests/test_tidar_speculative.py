"""TiDAR draft+verify and speculative decoding: greedy == greedy AR, exactness of the sampled distribution (with a
negative control that must fail), and cached step logits == uncached forwards (docs/algorithms.md §5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks as masks_lib
from ardiff.config import ModelConfig
from ardiff.model import Transformer, init_params
from ardiff.sampling import prefill, sample_ar
from ardiff.sampling.speculative import sample_speculative
from ardiff.sampling.tidar import TiDARDecodeMask, decode_inputs, sample_tidar

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py
VOCAB, MASK = 8, 7
CFG = ModelConfig(vocab_size=VOCAB, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  mask_token_id=MASK, init_std=0.5, scan_layers=False)
DCFG = CFG.replace(num_layers=1, init_std=0.4)


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


def test_eos_at_the_last_allowed_position(models):
  """A row whose first EOS is its last allowed token: kept, length == max_new_tokens, done; same in all samplers."""
  model, params, draft, dparams = models
  prompt, lens = _ragged([5, 2, 3, 6], 6)
  ar = np.asarray(sample_ar(params, model, prompt, lens, rng=jax.random.PRNGKey(0), max_new_tokens=16,
                            greedy=True).tokens)
  # A (row, token) whose first occurrence in that row is as late as possible, at index j >= 1.
  firsts = [(int(np.argmax(ar[r] == t)), r, t) for r in range(ar.shape[0]) for t in np.unique(ar[r])]
  j, r, eos = max(firsts)
  assert j >= 1
  kw = dict(max_new_tokens=j + 1, greedy=True, eos_id=int(eos), pad_id=MASK)
  ref = sample_ar(params, model, prompt, lens, rng=jax.random.PRNGKey(0), **kw)
  assert bool(ref.done[r]) and int(ref.lengths[r]) == j + 1 and int(ref.tokens[r, j]) == eos
  td = sample_tidar(params, model, prompt, lens, rng=jax.random.PRNGKey(1), block_size=3, **kw)
  sp = sample_speculative(params, model, dparams, draft, prompt, lens, rng=jax.random.PRNGKey(1), num_draft=2, **kw)
  for res in (td, sp):
    for field in ("tokens", "lengths", "done"):
      np.testing.assert_array_equal(np.asarray(getattr(res, field)), np.asarray(getattr(ref, field)))


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
