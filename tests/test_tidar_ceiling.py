"""The TiDAR drafting-ceiling benchmark's two estimators (benchmarks/tidar_ceiling.py), checked where the exact answer
is known: the first-draft bound against a linear program, the ideal-drafter chain against exact sums on a Markov
chain target."""

import os
import sys

import numpy as np
import pytest
from scipy.optimize import linprog

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from tidar_ceiling import best_first_acceptance, ideal_drafter_chain  # noqa: E402


@pytest.mark.parametrize("vocab", [2, 3, 6])
def test_best_first_acceptance_solves_the_linear_program(vocab):
  rng = np.random.default_rng(vocab)
  p_y = rng.dirichlet(np.ones(vocab))
  p_xy = rng.dirichlet(np.full(vocab, 0.5), size=vocab)
  # max sum_{y,x} p_y[y] m[y,x]  s.t.  0 <= m[y,x] <= p_xy[y,x],  m[y,x] <= q[x],  sum q = 1
  n = vocab * vocab
  cost = np.concatenate([-np.repeat(p_y, vocab), np.zeros(vocab)])
  a_ub = np.zeros((n, n + vocab))
  for y in range(vocab):
    for x in range(vocab):
      a_ub[y * vocab + x, y * vocab + x], a_ub[y * vocab + x, n + x] = 1.0, -1.0
  bounds = [(0, p_xy[y, x]) for y in range(vocab) for x in range(vocab)] + [(0, None)] * vocab
  lp = linprog(cost, A_ub=a_ub, b_ub=np.zeros(n), A_eq=np.concatenate([np.zeros(n), np.ones(vocab)])[None],
               b_eq=[1.0], bounds=bounds)
  assert lp.success
  assert best_first_acceptance(p_y, p_xy) == pytest.approx(-lp.fun, abs=1e-9)
  # the target's own marginal is one feasible drafter, so the optimum is at least its acceptance
  q = p_y @ p_xy
  assert best_first_acceptance(p_y, p_xy) >= (p_y[:, None] * np.minimum(p_xy, q)).sum() - 1e-12
  # a target whose next law ignores y is matched exactly by its marginal
  assert best_first_acceptance(p_y, np.tile(p_xy[0], (vocab, 1))) == pytest.approx(1.0)


def test_ideal_drafter_chain_matches_exact_sums_on_a_markov_target():
  vocab = 5
  trans = np.random.default_rng(70).dirichlet(np.full(vocab, 0.2), size=vocab)  # p(next | last token)
  p_y = trans[0]  # the prefix K ends in token 0
  q1, q2 = p_y @ trans, p_y @ trans @ trans  # exact marginals of the two positions after y
  acc_after = np.minimum(trans, q2).sum(1)  # a_2 given the accepted d_1
  acc1 = sum(p_y[y] * np.minimum(trans[y], q1).sum() for y in range(vocab))
  acc2 = sum(p_y[y] * np.minimum(trans[y, x], q1[x]) * acc_after[x] for y in range(vocab) for x in range(vocab))
  # the classic slip: an accepted d_1 distributed as p (not min(p, q) / a) gives a different second term
  slip = sum(p_y[y] * np.minimum(trans[y], q1).sum() * trans[y, x] * acc_after[x]
             for y in range(vocab) for x in range(vocab))
  assert abs(acc2 - slip) > 0.03
  out, first = ideal_drafter_chain(lambda history: trans[history[:, -1]], p_y, 2, paths=40000, chains=40000,
                                   rng=np.random.default_rng(1))
  assert first == pytest.approx(acc1, abs=0.01)
  np.testing.assert_allclose(out, [acc1, acc2], atol=0.01)
