"""The TiDAR oracle-drafter simulation (benchmarks/tidar_ceiling.py) against the exact answer on a second-order
Markov target, where TiDAR's decoding with the exact-marginal drafter is itself a small Markov chain whose stationary
law gives the expected tokens per step."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from tidar_ceiling import rollout_marginals, simulate_tidar  # noqa: E402

V = 3
TRANS = np.random.default_rng(1).dirichlet(np.full(V, 0.2), size=(V, V))  # p(next | last two tokens)


def _next_dist(rows, lengths):
  r = np.arange(len(rows))
  return TRANS[rows[r, lengths - 2], rows[r, lengths - 1]]


def _stationary(m):
  w, vecs = np.linalg.eig(m.T)
  pi = np.real(vecs[:, np.argmin(np.abs(w - 1.0))])
  return pi / pi.sum()


def _two_ahead(a, b):  # the law of the position after next, given the last two tokens a, b
  return np.einsum("z,zx->x", TRANS[a, b], TRANS[b])


def _three_ahead(a, b):
  return sum(TRANS[a, b, z] * TRANS[b, z, w] * TRANS[z, w] for z in range(V) for w in range(V))


def _residual(p, q):
  r = np.maximum(p - q, 0.0)
  return r / r.sum()


def _exact_tokens_per_step(block_size):
  """B = 2 or 3 TiDAR with the exact-marginal drafter. State (a, b, y): the last two committed tokens and the
  emitted, uncommitted one. Draft d_i ~ q_i (the law i + 1 positions after b, given a, b), accepted w.p.
  min(1, p_i[d_i] / q_i[d_i]) with p_i the target's law given everything before it. At the first rejection the
  committed prefix gains y and the accepted drafts and the next y is a correction from norm(max(0, p - q)); with all
  accepted, the bonus comes from the target after the last draft."""
  idx = lambda a, b, y: [(a * V + b) * V + z for z in range(V)]  # the states (a, b, *) as a list
  m, acc = np.zeros((V ** 3, V ** 3)), np.zeros(V ** 3)
  for a in range(V):
    for b in range(V):
      q1, q2 = _two_ahead(a, b), _three_ahead(a, b)
      for y in range(V):
        s, p1 = (a * V + b) * V + y, TRANS[b, y]
        k1 = np.minimum(1.0, p1 / q1)
        m[s, idx(b, y, 0)] += (1.0 - (q1 * k1).sum()) * _residual(p1, q1)
        for d1 in range(V):
          w1 = q1[d1] * k1[d1]  # d1 drawn and accepted
          if block_size == 2:
            acc[s] += w1
            m[s, idx(y, d1, 0)] += w1 * TRANS[y, d1]
            continue
          p2 = TRANS[y, d1]
          k2 = np.minimum(1.0, p2 / q2)
          a2 = (q2 * k2).sum()
          acc[s] += w1 * (1.0 + a2)
          m[s, idx(y, d1, 0)] += w1 * (1.0 - a2) * _residual(p2, q2)
          for d2 in range(V):
            m[s, idx(d1, d2, 0)] += w1 * q2[d2] * k2[d2] * TRANS[d1, d2]
  assert np.allclose(m.sum(1), 1.0)
  return 1.0 + _stationary(m) @ acc


def _per_prefix_shortcut():
  """The same acceptance averaged over the target's own positions with y ~ p (how an earlier version of the benchmark
  estimated it): it misses that a step starts where the last one stopped, after a correction from a residual."""
  pairs = np.zeros((V * V, V * V))
  for a in range(V):
    for b in range(V):
      pairs[a * V + b, b * V:(b + 1) * V] = TRANS[a, b]
  pi = _stationary(pairs)
  return 1.0 + sum(pi[a * V + b] * TRANS[a, b, y] * np.minimum(TRANS[b, y], _two_ahead(a, b)).sum()
                   for a in range(V) for b in range(V) for y in range(V))


def test_rollout_marginals_estimate_the_marginals():
  q = rollout_marginals(_next_dist, [0, 2], TRANS[0, 2], 2, paths=20000, rng=np.random.default_rng(0))
  z = np.arange(V)
  second = sum(TRANS[0, 2, y] * TRANS[2, y, x] * TRANS[y, x] for y in z for x in z)
  np.testing.assert_allclose(q, [_two_ahead(0, 2), second], atol=0.015)


@pytest.mark.parametrize("block_size", [2, 3])
def test_oracle_tidar_matches_the_exact_markov_answer(block_size):
  exact = _exact_tokens_per_step(block_size)
  if block_size == 2:
    assert abs(exact - _per_prefix_shortcut()) > 0.04  # a shortcut the simulation must not take: the test sees it
  steps = accepted = 0
  emitted = []
  for seed in range(6):
    r = simulate_tidar(_next_dist, [0, 0], block_size=block_size, num_tokens=1500, paths=3000,
                       rng=np.random.default_rng(seed), context=2)
    steps, accepted, emitted = steps + r["steps"], accepted + r["accepted"], emitted + r["tokens"]
  assert 1 + accepted / steps == pytest.approx(exact, abs=0.02)
  # the emitted text follows the target (speculative sampling is exact): trigram frequencies vs TRANS
  e = np.asarray(emitted)
  counts = np.zeros((V, V, V))
  np.add.at(counts, (e[:-2], e[1:-1], e[2:]), 1)
  seen = counts.sum(-1) > 200
  np.testing.assert_allclose((counts / np.maximum(counts.sum(-1, keepdims=True), 1))[seen], TRANS[seen], atol=0.05)


def test_bootstrap_drafts_see_the_first_token():
  # As in the sampler, the first drafts are conditioned on y: the first of them is drawn from the exact law of its
  # position, so an oracle's first draft is always accepted (a draft one position off would pass ~20% of the time).
  for seed in range(30):
    r = simulate_tidar(_next_dist, [0, 0], block_size=2, num_tokens=2, paths=50, rng=np.random.default_rng(seed),
                       context=2)
    assert (r["steps"], r["accepted"]) == (1, 1), seed
