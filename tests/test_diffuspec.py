"""DiffuSpec (block-diffusion drafter, AR verifier): exact AR law at every emitted position, greedy == greedy AR,
the drafter's cached window logits == an uncached BlockCausal forward, and the argument checks.

The law checks reuse tests/test_sampling_laws.py's tiny model, ragged two-prompt batch and chi-square machinery
(joint of the first T = 5 tokens, consecutive pairs, every marginal; T >= k + 2 covers the bonus token and the step
after it). The drafter is a random model run under ``BlockCausal(B)``: exactness must not depend on its quality.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks as masks_lib
from ardiff.sampling import sample_ar
from ardiff.sampling.diffuspec import fill_schedule, guided_verify, sample_diffuspec, window_size
from test_sampling_laws import MASK, T, _assert_exact, _assert_rejected, _batch, _law_pvalues, models  # noqa: F401

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py


def test_fill_schedule_and_window():
  np.testing.assert_array_equal(fill_schedule(5, 2), [0, 3, 5])
  np.testing.assert_array_equal(fill_schedule(3, 3), [0, 1, 2, 3])
  np.testing.assert_array_equal(fill_schedule(4, 1), [0, 4])
  assert window_size(4, 4) == 12 and window_size(3, 2) == 9 and window_size(2, 1) == 4


DIFFUSPEC_CASES = [  # (block_size, num_draft, draft_steps, temperature, top_k, top_p, draft_token_shift)
    (2, 2, 1, 1.0, 0, 1.0, False), (3, 3, 2, 0.7, 4, 0.6, False), (2, 3, 2, 0.8, 0, 1.0, True)]


@pytest.mark.parametrize("bs,k,steps,temperature,top_k,top_p,shift", DIFFUSPEC_CASES)
def test_diffuspec_law(models, bs, k, steps, temperature, top_k, top_p, shift):
  model, params, draft, dparams = models
  prompt, lens = _batch()
  res = sample_diffuspec(params, model, dparams, draft, prompt, lens, rng=jax.random.PRNGKey(300 + bs),
                         max_new_tokens=T, block_size=bs, num_draft=k, draft_steps=steps, temperature=temperature,
                         top_k=top_k, top_p=top_p, draft_token_shift=shift)
  np.testing.assert_array_equal(np.asarray(res.lengths), T)
  assert int(res.draft_nfe) == 1 + steps * int(res.steps)
  assert np.mean(np.asarray(res.accepted)) > 0.3  # drafts are accepted often enough to exercise the bonus path
  _assert_exact(_law_pvalues(res.tokens, model, params, temperature, top_k, top_p),
                ("diffuspec", bs, k, steps, shift))


def test_diffuspec_negative_control_is_rejected(models):
  model, params, draft, dparams = models
  prompt, lens = _batch()
  res = sample_diffuspec(params, model, dparams, draft, prompt, lens, rng=jax.random.PRNGKey(9), max_new_tokens=T,
                         block_size=2, num_draft=2, accept_rule="always_accept")
  _assert_rejected(_law_pvalues(res.tokens, model, params), "diffuspec always_accept")


def _ragged(lengths, width, seed=0):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(0, MASK, size=(len(lengths), width)).astype(np.int32)
  return prompt, np.array(lengths, np.int32)


@pytest.mark.parametrize("shift", [False, True])
def test_greedy_diffuspec_equals_greedy_ar_and_drafter_window_is_exact(models, shift):
  """Greedy DiffuSpec emits greedy AR's tokens; every drafter forward's logits predicting the draft slots equal an
  uncached ``BlockCausal(B)`` forward of [committed prefix ; the same window] at the slots' rows, or with
  ``draft_token_shift`` at the rows before them (positions past the window lie in later blocks and are invisible,
  so the references can share one padded batch)."""
  model, params, draft, dparams = models
  prompt, lens = _ragged([5, 2, 3, 6], 6)
  m, bs, k, n_fwd = 16, 3, 3, 2
  ar = sample_ar(params, model, prompt, lens, rng=jax.random.PRNGKey(0), max_new_tokens=m, greedy=True)
  ds = sample_diffuspec(params, model, dparams, draft, prompt, lens, rng=jax.random.PRNGKey(1), max_new_tokens=m,
                        block_size=bs, num_draft=k, draft_steps=n_fwd, greedy=True, draft_token_shift=shift,
                        return_trace=True)
  np.testing.assert_array_equal(np.asarray(ds.tokens), np.asarray(ar.tokens))
  assert int(ds.nfe) == 1 + int(ds.steps) and int(ds.draft_nfe) == 1 + n_fwd * int(ds.steps)

  tr = {key: np.asarray(v) for key, v in ds.trace.items()}
  full = [np.concatenate([prompt[r, :lens[r]], np.asarray(ar.tokens)[r]]) for r in range(len(lens))]
  w = window_size(bs, k)
  seqs, where, want = [], [], []
  for s in range(int(ds.steps)):
    for r in range(len(lens)):
      a, tail = tr["start"][s, r], tr["slots"][s, r]
      assert a % bs == 0 and 1 <= tail <= bs + k  # >= 1: a shifted slot 0 reads the window's row tail - 1
      if a + tail > len(full[r]):
        continue  # the row's committed tokens run past the generated ones kept in the result
      for f in range(n_fwd):
        window = tr["inputs"][s, f, r]
        np.testing.assert_array_equal(window[:tail], full[r][a:a + tail])  # the known tail
        seqs.append(np.concatenate([full[r][:a], window]))
        where.append(a + tail + np.arange(k) - int(shift))
        want.append(tr["logits"][s, f, r])
  assert len(seqs) > 20
  width = max(len(x) for x in seqs)
  assert all(len(x) % bs == 0 for x in seqs) and w % bs == 0
  batch = np.stack([np.pad(x, (0, width - len(x)), constant_values=MASK) for x in seqs])
  logits = np.asarray(draft.apply({"params": dparams}, jnp.asarray(batch), mask=masks_lib.BlockCausal(bs)).logits)
  got = np.stack([logits[i, where[i]] for i in range(len(seqs))])
  want = np.stack(want)
  np.testing.assert_allclose(want, got, rtol=1e-5, atol=1e-5 * float(np.abs(got).max()))
  # FreeCache-style guidance with tau = 1 keeps exactly the drafts that are the target's top-1: greedy AR again.
  guided = sample_diffuspec(params, model, dparams, draft, prompt, lens, rng=jax.random.PRNGKey(1),
                            max_new_tokens=m, block_size=bs, num_draft=k, draft_steps=n_fwd, greedy=True, guide=1.0,
                            draft_token_shift=shift)
  np.testing.assert_array_equal(np.asarray(guided.tokens), np.asarray(ar.tokens))


def test_guided_verify_rule():
  """Keep drafts while p(d) >= tau * max p; then a token from p_{n+1} (the target itself)."""
  p = np.log(np.array([[[.5, .3, .2], [.1, .6, .3], [.2, .2, .6]]] * 3))  # [3, k+1=3, V=3]
  drafts = np.array([[0, 1], [1, 2], [2, 2]], np.int32)
  n, y = guided_verify(jax.random.PRNGKey(0), jnp.asarray(p, jnp.float32), jnp.asarray(drafts), guide=0.55,
                       greedy=True)
  np.testing.assert_array_equal(np.asarray(n), [2, 1, 0])  # row 1: .3/.5 >= .55 keeps d_1, .3/.6 < .55 stops
  np.testing.assert_array_equal(np.asarray(y), [2, 1, 0])  # argmax of p_{n+1}


def test_diffuspec_argument_errors(models):
  model, params, draft, dparams = models
  prompt, lens = _ragged([2, 3], 3)
  call = lambda **kw: sample_diffuspec(params, model, dparams, draft, prompt, lens, rng=jax.random.PRNGKey(0),
                                       max_new_tokens=4, **{"block_size": 2, **kw})
  with pytest.raises(ValueError, match="draft_steps=3 must lie in"):
    call(num_draft=2, draft_steps=3)
  with pytest.raises(ValueError, match=r"num_draft \(0\)"):
    call(num_draft=0)
  with pytest.raises(ValueError, match="accept_rule must be one of"):
    call(accept_rule="bogus")
