"""Edge cases of the shared logit processing and argument checks (ardiff/sampling/common.py): top-p ties and
extremes (a traced top_p == 1 keeps the tail), [MASK] never sampled at any temperature / top-k / top-p, and clear
errors for bad decoding arguments in every sampler entry point."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks as masks_lib
from ardiff.config import ModelConfig
from ardiff.model import Transformer
from ardiff.sampling import common, sample_ar
from ardiff.sampling.speculative import sample_speculative
from ardiff.sampling.tidar import sample_tidar

pytestmark = pytest.mark.usefixtures("fast_compiles")  # a few small compiles, see conftest.py
V, MASK = 6, 5


def test_top_p_ties_are_kept_together():
  """Entries tied with the last kept one are kept too: the nucleus never depends on the sort order of ties."""
  logits = jnp.asarray([2.0, 0.0, 2.0, -1.0, 0.0, -3.0])
  out = np.asarray(common.top_p_filter(logits, 0.3))  # 0.3 < mass of one top token: both tied tops stay
  np.testing.assert_array_equal(out > common.NEG_INF / 2, [True, False, True, False, False, False])
  out = np.asarray(common.top_p_filter(logits, 0.9))  # needs the two 0.0 logits: both stay
  np.testing.assert_array_equal(out > common.NEG_INF / 2, [True, True, True, False, True, False])


def test_top_p_extremes():
  logits = jnp.asarray([[1.0, 3.0, 0.5, 2.9, -2.0, 0.0]])
  only_top = np.asarray(common.top_p_filter(logits, 1e-6))
  np.testing.assert_array_equal(only_top[0] > common.NEG_INF / 2, np.arange(V) == 1)
  # top_p == 1 keeps every token even when float32 probabilities of the tail vanish against the head (the cumulative
  # mass reaches 1.0 in float32 before the tail); traced, so the filter really runs.
  tail = jnp.asarray([[40.0, 0.0, -5.0, 1.0, -30.0, 2.0]])
  kept = jax.jit(common.top_p_filter)(tail, jnp.float32(1.0))
  np.testing.assert_array_equal(np.asarray(kept), np.asarray(tail))
  np.testing.assert_array_equal(np.asarray(common.process_logits(tail, top_p=1.0)), np.asarray(tail))


_sample_tokens = jax.jit(common.sample_tokens, static_argnames=("mask_token_id", "top_k", "top_p", "greedy"))


@pytest.mark.parametrize("temperature", [1e-8, 0.05, 1.0, 1e6, 1e30])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (3, 0.5), (0, 1e-6)])
def test_mask_never_sampled(temperature, top_k, top_p):
  """[MASK] has the LARGEST raw logit; after processing it has probability exactly 0 at any temperature (traced),
  top-k and top-p, and is never sampled."""
  logits = jnp.asarray([[0.5, -1.0, 2.0, 0.0, 1.0, 9.0]] * 2000)
  tok, processed = _sample_tokens(jax.random.PRNGKey(0), logits, mask_token_id=MASK,
                                  temperature=jnp.float32(temperature), top_k=top_k, top_p=top_p)
  assert float(jnp.max(jax.nn.softmax(processed, -1)[:, MASK])) == 0.0
  assert not np.any(np.asarray(tok) == MASK)


CFG = ModelConfig(vocab_size=V, embed_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
                  mask_token_id=MASK)
BAD = [(dict(top_p=0.0), r"top_p must lie in \(0, 1\].*got 0.0"), (dict(top_p=1.5), "top_p must lie in"),
       (dict(top_p=math.nan), "top_p must lie in"), (dict(top_k=-1), r"top_k must be an integer >= 0.*got -1"),
       (dict(temperature=-0.5), r"temperature must be >= 0 \(0 means greedy\), got -0.5"),
       (dict(temperature=math.nan), "temperature must be >= 0"),
       (dict(eos_id=V), r"eos_id=6 must lie in \[0, vocab_size=6\)"), (dict(eos_id=MASK), "is the \\[MASK\\] id")]


@pytest.mark.parametrize("kw,match", BAD)
@pytest.mark.parametrize("sampler", ["ar", "speculative", "tidar"])
def test_bad_decoding_arguments_are_named(sampler, kw, match):
  model = Transformer(CFG)
  prompt, lens = np.zeros((2, 3), np.int32), np.array([3, 2], np.int32)
  with pytest.raises(ValueError, match=match):  # raised before any tracing: no params needed
    if sampler == "ar":
      sample_ar(None, model, prompt, lens, rng=jax.random.PRNGKey(0), max_new_tokens=4, **kw)
    elif sampler == "speculative":
      sample_speculative(None, model, None, model, prompt, lens, rng=jax.random.PRNGKey(0), max_new_tokens=4, **kw)
    else:
      sample_tidar(None, model, prompt, lens, rng=jax.random.PRNGKey(0), max_new_tokens=4, **kw)


def test_generate_block_diffusion_gives_exactly_num_tokens():
  """``generate`` asks the block sampler for whole blocks after each prompt's partial last block (P mod B prompt
  tokens seed block 0), then cuts: every row gets exactly ``num_tokens`` new tokens whatever P mod B (an earlier
  ``ceil(n / B)`` blocks gave n - P mod B too few or up to B - 1 too many)."""
  from ardiff.sampling.generate import generate
  model = Transformer(CFG)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), mask=masks_lib.Causal())["params"]
  prompt = np.ones((3, 6), np.int32)
  for lens in ([1, 4, 5], [6, 2, 3]):
    for n in (1, 3, 4, 7):
      res = generate("block_diffusion", params, model, prompt, np.asarray(lens, np.int32), rng=jax.random.PRNGKey(1),
                     num_tokens=n, block_size=4)
      assert res.tokens.shape == (3, n), (lens, n, res.tokens.shape)
      np.testing.assert_array_equal(np.asarray(res.lengths), [n] * 3)
      assert not np.any(np.asarray(res.tokens) == MASK)


def test_generate_cut_leaves_an_eos_after_the_cut_unemitted(monkeypatch):
  """The cut at ``num_tokens``: a row whose EOS lies beyond it was not done; one whose EOS lies before keeps its
  length and done flag. (The block sampler's own EOS handling is tested with the sampler.)"""
  from ardiff.sampling import generate as generate_lib
  from ardiff.sampling.block_diffusion import BlockDiffusionResult
  def fake(params, model, prompt, prompt_lengths, *, block_size, num_blocks, **kw):
    tokens = jnp.asarray([[7, 7, 7, 7, 2, 0, 0, 0], [7, 2, 0, 0, 0, 0, 0, 0]])  # EOS = 2 at index 4 / 1
    return BlockDiffusionResult(tokens, tokens, jnp.asarray([5, 2]), jnp.asarray([True, True]), jnp.int32(3),
                                jnp.zeros((2, num_blocks), jnp.int32), None)
  monkeypatch.setattr(generate_lib, "sample_block_diffusion", fake)
  res = generate_lib.generate("block_diffusion", None, Transformer(CFG), np.ones((2, 4), np.int32),
                              np.asarray([4, 4]), rng=jax.random.PRNGKey(0), num_tokens=3, block_size=4, eos_id=2)
  np.testing.assert_array_equal(np.asarray(res.tokens), [[7, 7, 7], [7, 2, 0]])
  np.testing.assert_array_equal(np.asarray(res.lengths), [3, 2])
  np.testing.assert_array_equal(np.asarray(res.done), [False, True])


@pytest.mark.parametrize("kw,match", [(dict(block_size=0), r"block_size must be an integer >= 1, got 0"),
                                      (dict(num_tokens=0), r"num_tokens must be an integer >= 1, got 0"),
                                      (dict(num_tokens=2.5), "num_tokens must be an integer")])
def test_generate_refuses_bad_sizes(kw, match):
  from ardiff.sampling.generate import generate
  kw = dict(dict(num_tokens=4, block_size=4), **kw)
  with pytest.raises(ValueError, match=match):  # before any tracing: no params needed
    generate("block_diffusion", None, Transformer(CFG), np.ones((1, 3), np.int32), np.asarray([3]),
             rng=jax.random.PRNGKey(0), **kw)
