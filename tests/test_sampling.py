"""Sampler tests: cache exactness (AR and block diffusion, ragged batches, partial prompt blocks, fused writes,
token shift), cached greedy == uncached reference, commit rules, threshold limit, EOS, argument validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks as masks_lib
from ardiff.config import ModelConfig
from ardiff.model import Transformer, init_params
from ardiff.sampling import (commit_mask, prefill, reference_block_logits, reference_greedy_block_diffusion,
                             sample_ar, sample_block_diffusion)
from ardiff.sampling.block_diffusion import BlockDiffusionOptions, first_sub_block

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py
CFG = ModelConfig(vocab_size=24, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  mask_token_id=23, init_std=0.5)
MASK = 23


@pytest.fixture(scope="module")
def setup():
  model = Transformer(CFG)
  params = init_params(CFG, jax.random.PRNGKey(0))
  return model, params


def _ragged_prompt(lengths, width, seed=1):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(0, MASK, size=(len(lengths), width)).astype(np.int32)
  for r, n in enumerate(lengths):
    prompt[r, n:] = 0  # padding
  return prompt, np.asarray(lengths, np.int32)


_FWD = {}


def _uncached(model, params, seqs, mask):
  if mask not in _FWD:
    _FWD[mask] = jax.jit(lambda p, t: model.apply({"params": p}, t, mask=mask).logits)
  return np.array(_FWD[mask](params, jnp.asarray(seqs)))


def test_prefill_ragged_last_logits(setup):
  model, params = setup
  prompt, lens = _ragged_prompt([3, 7, 5], 7)
  cache, last = prefill(params, model, jnp.asarray(prompt), jnp.asarray(lens), 12, masks_lib.Causal())
  np.testing.assert_array_equal(np.asarray(cache.lengths), lens)
  full = _uncached(model, params, prompt, masks_lib.Causal())
  np.testing.assert_allclose(np.asarray(last), full[np.arange(3), lens - 1], atol=1e-5)


def _ar_reference(model, params, prompt, lens, tokens):
  """Uncached logits that produced each generated token: [max_new, b, V]."""
  b, new = tokens.shape
  seqs = np.zeros((b, prompt.shape[1] + new), np.int32)
  for r in range(b):
    seqs[r, :lens[r]] = prompt[r, :lens[r]]
    seqs[r, lens[r]:lens[r] + new] = tokens[r]
  full = _uncached(model, params, seqs, masks_lib.Causal())
  return np.stack([full[np.arange(b), lens - 1 + i] for i in range(new)])


@pytest.mark.parametrize("greedy", [True, False])
def test_ar_cached_logits_match_uncached_ragged(setup, greedy):
  model, params = setup
  prompt, lens = _ragged_prompt([2, 6, 4], 6)
  res = sample_ar(params, model, prompt, lens, rng=jax.random.PRNGKey(3), max_new_tokens=6, greedy=greedy,
                  temperature=0.8, top_k=10, top_p=0.95, return_logits=True)
  tokens = np.asarray(res.tokens)
  ref = _ar_reference(model, params, prompt, lens, tokens)
  np.testing.assert_allclose(np.asarray(res.step_logits), ref, atol=1e-5)
  assert int(res.nfe) == 6
  assert (tokens != MASK).all()  # [MASK] is never sampled
  if greedy:  # greedy == argmax of the uncached forward, token by token
    ref_masked = ref.copy()
    ref_masked[..., MASK] = -np.inf
    np.testing.assert_array_equal(tokens, ref_masked.argmax(-1).T)


def test_ar_greedy_matches_uncached_loop(setup):
  """Greedy AR == growing the sequence by the argmax of a full uncached forward, one token at a time."""
  model, params = setup
  prompt, lens = _ragged_prompt([3, 5], 5, seed=7)
  res = sample_ar(params, model, prompt, lens, rng=jax.random.PRNGKey(0), max_new_tokens=5, temperature=0)
  for r in range(2):
    seq = list(prompt[r, :lens[r]])
    for _ in range(5):
      padded = np.zeros((1, 10), np.int32)  # fixed shape: one compile; trailing padding is invisible (causal)
      padded[0, :len(seq)] = seq
      logits = _uncached(model, params, padded, masks_lib.Causal())[0, len(seq) - 1]
      logits[MASK] = -np.inf
      seq.append(int(logits.argmax()))
    np.testing.assert_array_equal(np.asarray(res.tokens)[r], seq[lens[r]:])


def test_ar_eos_stops_rows_independently(setup):
  model, params = setup
  prompt, lens = _ragged_prompt([3, 5], 5, seed=7)
  base = np.asarray(sample_ar(params, model, prompt, lens, rng=jax.random.PRNGKey(0), max_new_tokens=6,
                              temperature=0).tokens)
  eos = int(base[0, 2])  # row 0 emits this at step 2
  first = [int(np.argmax(base[r] == eos)) if (base[r] == eos).any() else 6 for r in range(2)]
  res = sample_ar(params, model, prompt, lens, rng=jax.random.PRNGKey(0), max_new_tokens=6, temperature=0,
                  eos_id=eos, pad_id=0)
  tokens = np.asarray(res.tokens)
  for r in range(2):
    f = first[r]
    np.testing.assert_array_equal(tokens[r, :f + 1][:6], base[r, :f + 1][:6])
    assert (tokens[r, f + 1:] == 0).all()
    assert int(res.lengths[r]) == min(f + 1, 6)
    assert bool(res.done[r]) == (f < 6)


BS = 4


def _check_trace(params, model, prompt, lens, res, bs, token_shift):
  """Every (forward, row) with fresh logits == the uncached BlockCausal forward of the sequence it stands for.
  Returns ``used [S, b]``; also checks that each row's successive inputs for a block only fill masks."""
  ref = reference_block_logits(params, model, prompt, lens, res, bs)
  used = np.asarray(res.trace["block"]) >= 0
  assert used.sum() == int(np.asarray(res.steps_per_block_used).sum()) > 0
  # float32: the cached (T = B) and full-length matmuls round differently by a few ulps of the largest summands,
  # so the absolute tolerance is 1e-5 of the logit scale (init_std=0.5 gives logits of magnitude ~5).
  got, want = np.asarray(res.trace["logits"])[used], ref[used][:, 1:]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
  if token_shift:  # the clean prefix's last row, which predicts each block's first position
    want_last = ref[used][:, 0]
    has = ~np.isnan(want_last[..., 0])
    assert has.any()
    np.testing.assert_allclose(np.asarray(res.trace["last"])[used][has], want_last[has], rtol=1e-5,
                               atol=1e-5 * float(np.abs(want_last[has]).max()))
  inputs, blocks = np.asarray(res.trace["inputs"]), np.asarray(res.trace["block"])
  for r in range(used.shape[1]):
    steps = np.flatnonzero(used[:, r])
    for s0, s1 in zip(steps[:-1], steps[1:]):
      if blocks[s0, r] == blocks[s1, r]:  # the same block: committed tokens never change, and a forward follows
        prev, cur = inputs[s0, r], inputs[s1, r]  # a change (ddpm_cache reuses logits otherwise)
        np.testing.assert_array_equal(cur[prev != MASK], prev[prev != MASK])
        assert ((prev == MASK) & (cur != MASK)).any()
  return used


@pytest.mark.parametrize("strategy,kv_write,token_shift,lengths", [
    ("topk_confidence", "separate", False, [4, 8, 4]),
    ("threshold", "separate", False, [5, 8, 2]),  # partial prompt blocks seed block 0
    ("threshold", "fused", True, [5, 8, 1]),
    ("ddpm_cache", "fused", False, [3, 6, 7]),
    ("first_hitting", "separate", True, [4, 7, 2]),
])
def test_block_diffusion_cached_logits_match_uncached_ragged(setup, strategy, kv_write, token_shift, lengths):
  model, params = setup
  prompt, lens = _ragged_prompt(lengths, 8, seed=2)
  res = sample_block_diffusion(params, model, prompt, lens, rng=jax.random.PRNGKey(5), block_size=BS,
                               num_blocks=3, strategy=strategy, steps_per_block=2, threshold=0.3, gamma=1.0,
                               kv_write=kv_write, token_shift=token_shift, temperature=1.0, return_trace=True)
  used = _check_trace(params, model, prompt, lens, res, BS, token_shift)
  # NFE = prefill + batched denoising forwards (+ forwards that only write a clean block when separate)
  serving = int(used.any(axis=1).sum())
  if kv_write == "fused":
    assert int(res.nfe) == 1 + serving
  else:
    assert 1 + serving <= int(res.nfe) <= 1 + serving + 2 * len(lens)
  raw = np.asarray(res.raw_blocks)
  assert (raw != MASK).all()
  tail = lens % BS
  for r in range(len(lens)):  # block 0 starts with the prompt's tail, and the generated tokens follow it
    np.testing.assert_array_equal(raw[r, :tail[r]], prompt[r, lens[r] - tail[r]:lens[r]])
    np.testing.assert_array_equal(np.asarray(res.tokens)[r, :3 * BS - tail[r]], raw[r, tail[r]:])
    assert int(res.lengths[r]) == 3 * BS - tail[r]


@pytest.mark.parametrize("kw", [
    dict(strategy="topk_confidence"),
    dict(strategy="topk_confidence", steps_per_block=2, kv_write="fused"),
    dict(strategy="threshold", threshold=0.5, token_shift=True),
    dict(strategy="dynamic", threshold=0.4, steps_per_block=2, kv_write="fused", token_shift=True),
    dict(strategy="factor", factor=2.0, sub_block_size=2),
    dict(strategy="entropy_bounded", gamma=0.8, kv_write="fused"),
])
def test_greedy_block_diffusion_equals_uncached_reference(setup, kw):
  """The whole cached sampler (prefill, partial prompt blocks, fused or separate writes, token shift, sub-blocks)
  == the same rule driven by full uncached forwards, token for token."""
  model, params = setup
  prompt, lens = _ragged_prompt([5, 8, 2], 8, seed=11)
  res = sample_block_diffusion(params, model, prompt, lens, rng=jax.random.PRNGKey(0), block_size=BS,
                               num_blocks=3, temperature=0, **kw)
  ref_kw = {key: v for key, v in kw.items() if key != "kv_write"}
  ref = reference_greedy_block_diffusion(params, model, prompt, lens, block_size=BS, num_blocks=3, **ref_kw)
  np.testing.assert_array_equal(np.asarray(res.raw_blocks), ref)


def test_fused_write_saves_one_forward_per_block(setup):
  model, params = setup
  prompt, lens = _ragged_prompt([6, 3], 8, seed=5)
  kw = dict(rng=jax.random.PRNGKey(1), block_size=BS, num_blocks=4, strategy="threshold", threshold=0.6,
            temperature=0)
  sep = sample_block_diffusion(params, model, prompt, lens, kv_write="separate", **kw)
  fus = sample_block_diffusion(params, model, prompt, lens, kv_write="fused", **kw)
  np.testing.assert_array_equal(np.asarray(fus.tokens), np.asarray(sep.tokens))
  np.testing.assert_array_equal(np.asarray(fus.steps_per_block_used), np.asarray(sep.steps_per_block_used))
  for r in range(2):  # one row alone: the separate write costs exactly one forward per block but the last
    one = dict(kw, prompt_lengths=lens[r:r + 1])
    sep1 = sample_block_diffusion(params, model, prompt[r:r + 1], kv_write="separate", **one)
    fus1 = sample_block_diffusion(params, model, prompt[r:r + 1], kv_write="fused", **one)
    np.testing.assert_array_equal(np.asarray(fus1.tokens), np.asarray(fus.tokens)[r:r + 1])
    assert int(fus1.nfe) == 1 + int(np.asarray(fus1.steps_per_block_used).sum()) == int(sep1.nfe) - 3


def test_rows_progress_independently(setup):
  """A row that finishes its blocks in few steps does not wait for a slow row: the batch needs as many forwards
  as its slowest row alone, not the sum over blocks of the slowest row per block."""
  model, params = setup
  prompt, lens = _ragged_prompt([6, 3, 8], 8, seed=8)
  kw = dict(rng=jax.random.PRNGKey(1), block_size=BS, num_blocks=5, strategy="threshold", threshold=0.3,
            temperature=0)
  batch = sample_block_diffusion(params, model, prompt, lens, **kw)
  alone = [sample_block_diffusion(params, model, prompt[r:r + 1], lens[r:r + 1], **kw) for r in range(3)]
  for r in range(3):
    np.testing.assert_array_equal(np.asarray(batch.tokens)[r], np.asarray(alone[r].tokens)[0])
    np.testing.assert_array_equal(np.asarray(batch.steps_per_block_used)[r],
                                  np.asarray(alone[r].steps_per_block_used)[0])
  per_row = np.asarray(batch.steps_per_block_used)
  assert int(batch.nfe) == max(int(a.nfe) for a in alone)
  assert int(batch.nfe) < 1 + per_row.max(axis=0).sum()  # what rows advancing in lockstep would have cost


def test_ddpm_cache_reuses_logits(setup):
  """With 64 time steps most steps unmask nothing: those reuse the cached logits (no forward)."""
  model, params = setup
  prompt, lens = _ragged_prompt([4, 4], 8, seed=6)
  res = sample_block_diffusion(params, model, prompt, lens, rng=jax.random.PRNGKey(2), block_size=BS,
                               num_blocks=2, strategy="ddpm_cache", steps_per_block=64, temperature=1.0,
                               return_trace=True)
  per_block = np.asarray(res.steps_per_block_used)
  assert (per_block >= 1).all() and (per_block <= BS).all()  # a row's logits are refreshed only after it changed
  assert (np.asarray(res.raw_blocks) != MASK).all()
  _check_trace(params, model, prompt, lens, res, BS, token_shift=False)


def test_left_padding_equals_right_padding(setup):
  model, params = setup
  prompt, lens = _ragged_prompt([5, 8, 2], 8, seed=9)
  left = np.zeros_like(prompt)
  for r, n in enumerate(lens):
    left[r, 8 - n:] = prompt[r, :n]
  kw = dict(rng=jax.random.PRNGKey(4), block_size=BS, num_blocks=2, strategy="threshold", temperature=1.0)
  a = sample_block_diffusion(params, model, prompt, lens, **kw)
  b = sample_block_diffusion(params, model, left, lens, padding_side="left", **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  c = sample_ar(params, model, prompt, lens, rng=jax.random.PRNGKey(4), max_new_tokens=5)
  d = sample_ar(params, model, left, lens, rng=jax.random.PRNGKey(4), max_new_tokens=5, padding_side="left")
  np.testing.assert_array_equal(np.asarray(c.tokens), np.asarray(d.tokens))


def test_threshold_limit_equals_top1_confidence(setup):
  model, params = setup
  prompt, lens = _ragged_prompt([4, 8, 4], 8, seed=3)
  kw = dict(rng=jax.random.PRNGKey(1), block_size=BS, num_blocks=3, temperature=0)
  a = sample_block_diffusion(params, model, prompt, lens, strategy="threshold", threshold=1.0 + 1e-6, **kw)
  b = sample_block_diffusion(params, model, prompt, lens, strategy="topk_confidence", steps_per_block=BS, **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert int(a.nfe) == int(b.nfe) == 1 + 3 * BS  # prefill + one token per forward (clean blocks fused-written)
  # A low threshold commits more per step: fewer NFEs.
  c = sample_block_diffusion(params, model, prompt, lens, strategy="threshold", threshold=0.0, **kw)
  assert int(c.nfe) == 1 + 3


@pytest.mark.parametrize("kv_write", ["separate", "fused"])
def test_block_diffusion_eos_stops_rows(setup, kv_write):
  model, params = setup
  prompt, lens = _ragged_prompt([4, 8], 8, seed=4)
  kw = dict(rng=jax.random.PRNGKey(1), block_size=BS, num_blocks=3, temperature=0, strategy="topk_confidence",
            kv_write=kv_write)
  base = np.asarray(sample_block_diffusion(params, model, prompt, lens, **kw).tokens)
  eos = int(base[0, 1])  # row 0 emits it in block 0
  res = sample_block_diffusion(params, model, prompt, lens, eos_id=eos, pad_id=0, **kw)
  tokens = np.asarray(res.tokens)
  for r in range(2):
    hit = base[r] == eos
    f = int(np.argmax(hit)) if hit.any() else None
    if f is None:
      np.testing.assert_array_equal(tokens[r], base[r])
      assert not bool(res.done[r])
    else:
      blk_end = (f // BS + 1) * BS
      np.testing.assert_array_equal(tokens[r, :f + 1], base[r, :f + 1])
      assert (tokens[r, f + 1:] == 0).all()
      assert int(res.lengths[r]) == f + 1 and bool(res.done[r])
      assert (np.asarray(res.raw_blocks)[r, blk_end:] == 0).all()  # later blocks are not denoised for this row
  assert np.asarray(res.done)[0]


# One row: positions 0-2 are [MASK], position 3 is clean; each case names its strategy, arguments and the commit.
_U = [[0.1, 0.6, 0.3, 0.0]]  # ddpm_cache's per-position uniforms


@pytest.mark.parametrize("strategy,kw,want", [
    ("threshold", dict(k=1, threshold=0.9), [True, False, True, False]),
    ("threshold", dict(k=1, threshold=1.01), [True, False, False, False]),
    # factor f=1: c_(1)=0.95 passes (i=1: >= 0.5), c_(2)=0.92 >= 1-1/3, c_(3)=0.5 < 1-1/4 -> n=2
    ("factor", dict(k=1, factor=1.0), [True, False, True, False]),
    # entropy-bounded γ=0.35: 0.1 + 0.2 <= 0.35, + 0.3 > 0.35 -> two lowest-entropy masked positions
    ("entropy_bounded", dict(k=1, gamma=0.35), [True, False, True, False]),
    ("entropy_bounded", dict(k=1, gamma=0.0), [True, False, False, False]),
    ("topk_confidence", dict(k=2), [True, False, True, False]),
    # SDAR dynamic, k=2: two confidences > 0.9 -> exactly those; with τ = 0.93 only one -> top-2 instead
    ("dynamic", dict(k=2, threshold=0.9), [True, False, True, False]),
    ("dynamic", dict(k=1, threshold=0.4), [True, True, True, False]),
    ("dynamic", dict(k=2, threshold=0.93), [True, False, True, False]),
    ("dynamic", dict(k=3, threshold=0.93), [True, True, True, False]),
    # ddpm_cache: independent unmasking w.p. unmask_prob (may commit nothing); prob 1 unmasks every mask
    ("ddpm_cache", dict(k=1, unmask_prob=0.5, rand_score=_U), [True, False, True, False]),
    ("ddpm_cache", dict(k=1, unmask_prob=0.05, rand_score=_U), [False, False, False, False]),
    ("ddpm_cache", dict(k=1, unmask_prob=1.0, rand_score=_U), [True, True, True, False]),
])
def test_commit_rules(strategy, kw, want):
  kw = dict(kw)
  rand_score = jnp.asarray(kw.pop("rand_score", [[0.0] * 4]))
  got = commit_mask(strategy, masked=jnp.asarray([[True, True, True, False]]),
                    conf=jnp.asarray([[0.95, 0.5, 0.92, 0.99]]), entropy=jnp.asarray([[0.1, 0.3, 0.2, 0.0]]),
                    rand_score=rand_score, **kw)
  np.testing.assert_array_equal(np.asarray(got), [want])


def test_commit_rules_reject_an_unknown_strategy():
  masked = jnp.asarray([[True, True, True, False]])
  with pytest.raises(ValueError, match="strategy must be one of"):
    commit_mask("nope", masked=masked, conf=jnp.zeros((1, 4)), entropy=jnp.zeros((1, 4)), rand_score=jnp.zeros((1, 4)),
                k=1)


def test_sub_block_commits_left_to_right():
  masked = jnp.asarray([[False, True, True, True, True, True, True, True]])
  np.testing.assert_array_equal(np.asarray(first_sub_block(masked, 4)), [[False, True, True, True] + [False] * 4])
  masked = jnp.asarray([[False, False, True, False, True, True, False, True]])
  np.testing.assert_array_equal(np.asarray(first_sub_block(masked, 2)), [[False, False, True, False] + [False] * 4])


@pytest.mark.parametrize("kw,match", [
    (dict(prompt_lengths=[0, 6]), r"must lie in \[1, 8\]"),
    (dict(prompt_lengths=[4, 9]), r"must lie in \[1, 8\]"),
    (dict(strategy="fastest"), "strategy must be one of"),
    (dict(kv_write="lazy"), "kv_write must be one of"),
    (dict(sub_block_size=3), "sub_block_size=3 must be a positive divisor of block_size=4"),
    (dict(steps_per_block=5), r"steps_per_block must be in \[1, block_size=4\]"),
    (dict(padding_side="middle"), "padding_side must be"),
    (dict(steps_per_block=0), r"steps_per_block must be in \[1, block_size=4\], got 0"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(eos_id=MASK), r"eos_id=23 is the \[MASK\] id"),
    (dict(eos_id=24), r"eos_id=24 must lie in \[0, vocab_size=24\)"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(threshold=float("nan")), "threshold must be a finite number"),
])
def test_block_diffusion_validates_arguments(setup, kw, match):
  model, params = setup
  prompt, _ = _ragged_prompt([4, 6], 8)
  args = dict(prompt_lengths=[4, 6], rng=jax.random.PRNGKey(0), block_size=BS, num_blocks=1)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    sample_block_diffusion(params, model, prompt, **args)
  no_mask = Transformer(CFG.replace(mask_token_id=None))
  with pytest.raises(ValueError, match="mask_token_id"):
    sample_block_diffusion(params, no_mask, prompt, [4, 6], rng=jax.random.PRNGKey(0), block_size=BS, num_blocks=1)


def test_options_are_one_hashable_static_argument():
  """Equal settings give equal, hashable options (one compile); the default steps_per_block is block_size."""
  a = BlockDiffusionOptions.create(CFG, block_size=BS, num_blocks=2)
  b = BlockDiffusionOptions.create(CFG, block_size=BS, num_blocks=2, steps_per_block=BS)
  assert a == b and hash(a) == hash(b) and a.k == 1 and a.mask_id == MASK
  assert BlockDiffusionOptions.create(CFG, block_size=BS, num_blocks=2, steps_per_block=2).k == 2
  with pytest.raises(AttributeError):
    a.block_size = 8  # frozen
  # ddpm_cache with sub-blocks: steps - 1 steps that may commit nothing, then one sub-block per step
  opts = BlockDiffusionOptions.create(CFG, block_size=BS, num_blocks=3, strategy="ddpm_cache", steps_per_block=2,
                                      sub_block_size=1)
  assert opts.max_iters == 3 * (2 - 1 + BS + 1)


def test_ddpm_cache_with_sub_blocks_finishes_every_block(setup):
  """ddpm_cache with sub-blocks needs more loop iterations than time steps (at prob 1 it unmasks one sub-block per
  step): every block must still be finished (it was cut off at `num_blocks * (steps + 1)` iterations, leaving
  pad_id blocks while `lengths` claimed them), and every forward stays exact."""
  model, params = setup
  prompt, lens = _ragged_prompt([3, 6, 7], 8, seed=2)
  res = sample_block_diffusion(params, model, prompt, lens, rng=jax.random.PRNGKey(5), block_size=BS,
                               num_blocks=3, strategy="ddpm_cache", steps_per_block=2, sub_block_size=1,
                               temperature=1.0, pad_id=-1, return_trace=True)
  raw = np.asarray(res.raw_blocks)
  assert (raw >= 0).all() and (raw != MASK).all()  # every block was denoised to the end
  lengths = np.asarray(res.lengths)
  np.testing.assert_array_equal(lengths, 3 * BS - lens % BS)
  assert (np.asarray(res.tokens)[np.arange(3 * BS)[None] < lengths[:, None]] >= 0).all()
  assert (np.asarray(res.steps_per_block_used) >= 1).all()
  _check_trace(params, model, prompt, lens, res, BS, token_shift=False)


def test_prompt_mask_tokens_are_never_resampled(setup):
  """A prompt token equal to the [MASK] id is a prompt token: the partial block it seeds keeps it (it used to be
  treated as a position to generate and overwritten), and whole prompt blocks condition on it as given."""
  model, params = setup
  prompt = np.array([[1, MASK, 2, 3, 4, MASK], [MASK, 5, 6, 0, 0, 0]], np.int32)
  lens = np.array([6, 3], np.int32)
  kw = dict(block_size=BS, num_blocks=2, strategy="threshold", threshold=0.5, token_shift=True)
  res = sample_block_diffusion(params, model, prompt, lens, rng=jax.random.PRNGKey(0), temperature=0,
                               kv_write="separate", **kw)
  raw = np.asarray(res.raw_blocks)
  for r, n in enumerate(lens):
    tail = n % BS
    np.testing.assert_array_equal(raw[r, :tail], prompt[r, n - tail:n])
    assert (raw[r, tail:] != MASK).all() and int(res.lengths[r]) == 2 * BS - tail
  np.testing.assert_array_equal(raw, reference_greedy_block_diffusion(params, model, prompt, lens, **kw))


def test_eos_on_the_last_position_of_a_block(setup):
  """EOS committed at a block's last position ends the row there: no later block is denoised or recorded for it,
  its finished block never changes again, and the other row is unaffected."""
  model, params = setup
  prompt, lens = _ragged_prompt([4, 8], 8, seed=7)
  kw = dict(rng=jax.random.PRNGKey(1), block_size=BS, num_blocks=3, temperature=0, strategy="topk_confidence")
  base = sample_block_diffusion(params, model, prompt, lens, **kw)
  tokens0 = np.asarray(base.tokens)
  eos = int(tokens0[0, BS - 1])  # prompt 0 is block-aligned: its first block is tokens 0..B-1
  assert eos not in tokens0[0, :BS - 1], "pick a seed whose EOS first appears at the block's last position"
  res = sample_block_diffusion(params, model, prompt, lens, eos_id=eos, pad_id=0, **kw)
  tokens, raw = np.asarray(res.tokens), np.asarray(res.raw_blocks)
  np.testing.assert_array_equal(tokens[0, :BS], tokens0[0, :BS])
  assert (tokens[0, BS:] == 0).all() and (raw[0, BS:] == 0).all()
  assert int(res.lengths[0]) == BS and bool(res.done[0])
  np.testing.assert_array_equal(np.asarray(res.steps_per_block_used)[0, 1:], 0)
  hit = tokens0[1] == eos
  f = int(np.argmax(hit)) if hit.any() else 3 * BS
  np.testing.assert_array_equal(tokens[1, :f + 1], tokens0[1, :f + 1])
  assert int(res.lengths[1]) == min(f + 1, 3 * BS) and bool(res.done[1]) == bool(hit.any())


def test_vanishing_nucleus_samples_the_argmax(setup):
  """top_p -> 0 at temperature 1 keeps exactly the top token: the same tokens as greedy, never an
  empty distribution (uniform over the vocabulary, [MASK] included). first_hitting's positions do not depend on the
  token draws, so the runs are comparable token for token."""
  model, params = setup
  prompt, lens = _ragged_prompt([5, 8], 8, seed=3)
  kw = dict(rng=jax.random.PRNGKey(2), block_size=BS, num_blocks=2, strategy="first_hitting")
  greedy = np.asarray(sample_block_diffusion(params, model, prompt, lens, temperature=0, **kw).raw_blocks)
  got = sample_block_diffusion(params, model, prompt, lens, temperature=1.0, top_p=1e-6, **kw)
  np.testing.assert_array_equal(np.asarray(got.raw_blocks), greedy)
