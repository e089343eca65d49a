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


def _exact_tokens_per_step():
  """B = 2 TiDAR with the exact-marginal drafter. State (a, b, y): the last two committed tokens and the emitted,
  uncommitted one. The draft d ~ q = _two_ahead(a, b) is accepted w.p. min(1, p[d] / q[d]), p = TRANS[b, y];
  accepted: commit y, d and draw the bonus from TRANS[y, d] (state (y, d, y')); rejected: commit y and draw the
  correction from norm(max(0, p - q)) (state (b, y, y'))."""
  idx = lambda a, b, y: (a * V + b) * V + y
  m, acc = np.zeros((V ** 3, V ** 3)), np.zeros(V ** 3)
  for a in range(V):
    for b in range(V):
      q = _two_ahead(a, b)
      for y in range(V):
        p, s = TRANS[b, y], idx(a, b, y)
        keep = np.minimum(1.0, p / q)
        for d in range(V):
          for y2 in range(V):
            m[s, idx(y, d, y2)] += q[d] * keep[d] * TRANS[y, d, y2]
        acc[s] = (q * keep).sum()
        residual = np.maximum(p - q, 0.0)
        for y2 in range(V):
          m[s, idx(b, y, y2)] += (1.0 - acc[s]) * residual[y2] / residual.sum()
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


def test_oracle_tidar_matches_the_exact_markov_answer():
  exact = _exact_tokens_per_step()
  assert abs(exact - _per_prefix_shortcut()) > 0.04  # a shortcut the simulation must not take: the test sees it
  steps = accepted = 0
  emitted = []
  for seed in range(6):
    r = simulate_tidar(_next_dist, [0, 0], block_size=2, num_tokens=1500, paths=3000,
                       rng=np.random.default_rng(seed), context=2)
    steps, accepted, emitted = steps + r["steps"], accepted + r["accepted"], emitted + r["tokens"]
  assert 1 + accepted / steps == pytest.approx(exact, abs=0.02)
  # the emitted text follows the target (speculative sampling is exact): trigram frequencies vs TRANS
  e = np.asarray(emitted)
  counts = np.zeros((V, V, V))
  np.add.at(counts, (e[:-2], e[1:-1], e[2:]), 1)
  seen = counts.sum(-1) > 200
  np.testing.assert_allclose((counts / np.maximum(counts.sum(-1, keepdims=True), 1))[seen], TRANS[seen], atol=0.05)
