"""How many tokens per forward could TiDAR reach with a perfect drafter? The ceiling that TiDAR's drafting scheme sets
for a given target, measured with the target itself.

    python benchmarks/tidar_ceiling.py --run runs/results/tidar_b4_ar [--max_block 8] [--json out.json]

TiDAR (ardiff/sampling/tidar.py) drafts the next step's tokens in the same forward that verifies the current ones, so
its drafts cannot see the token that verification emits: with the prefix K known to the drafter, a step emits ``y`` at
position |K| and its drafts d_1..d_{B-1} (for |K|+1 .. |K|+B-1) are drawn independently, each from a one-step
diffusion marginal given K alone. The best drafter of that form (what TiDAR's all-[MASK] cross-entropy trains toward)
draws each position from its exact marginal under the target, ``q_i(x) = P(x_{|K|+i} = x | K)``. Under the target's
AR mode with the sampler's processing (temperature, top-p) this script measures:

* ``ceiling(B)``: expected tokens per step of TiDAR with that ideal drafter, ``1 + sum_i P(d_1..d_i accepted)``
  (Monte Carlo: the marginals from ``--paths`` rollouts of the target; acceptance along ``--chains`` separate chains,
  ``P(d_1..d_i accepted) = E[prod_l a_l]`` with each accepted draft drawn from ``min(p, q) / a``);
* ``bound(B) = 1 + (B - 1) a*``, ``a*`` the largest first-draft acceptance that ANY drafter of TiDAR's form can have,
  ``max_q E_y sum_x min(p(x | K, y), q(x))``, solved exactly per prefix (a fractional knapsack over all ``y``).

Prefixes K are the target's own samples after results.py's prompts (the law decoding runs on), every ``--stride``-th
position. One batched forward per rollout step; about ten CPU-minutes for the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def best_first_acceptance(p_y, p_xy) -> float:
  """``max_q sum_x E_y min(p_xy[y, x], q[x])`` over distributions ``q``, with ``y ~ p_y [V]``, ``p_xy [V, V]``.

  Each ``x`` contributes ``g_x(q_x) = E_y min(p_xy[y, x], q_x)``, concave and piecewise linear in ``q_x`` with slope
  ``P(p_xy[y, x] > q_x)``; maximising a sum of such terms under ``sum q = 1`` is a fractional knapsack: spend the mass
  on the segments of highest slope first.
  """
  import numpy as np
  order = np.argsort(p_xy, axis=0)
  vals = np.take_along_axis(p_xy, order, axis=0)  # [V_y sorted, V_x]
  weights = p_y[order]
  slope = np.cumsum(weights[::-1], axis=0)[::-1]  # on (vals[i-1], vals[i]]: P(p > t) = weight of entries >= vals[i]
  seg = np.diff(vals, axis=0, prepend=0.0)
  slope, seg = slope.ravel(), seg.ravel()
  order = np.argsort(-slope, kind="stable")
  slope, seg = slope[order], seg[order]
  spent = np.cumsum(seg)
  full = spent <= 1.0
  value = float((slope[full] * seg[full]).sum())
  k = int(full.sum())
  if k < len(seg):  # the segment where the unit of mass runs out, taken in part
    value += float(slope[k] * (1.0 - (spent[k - 1] if k else 0.0)))
  return value


def draw(rng, probs):
  """One index per row of ``probs [R, V]`` (rows summing to 1 up to rounding)."""
  import numpy as np
  c = np.cumsum(probs.astype(np.float64), axis=1)
  u = rng.random((probs.shape[0], 1)) * c[:, -1:]
  return np.minimum((c < u).sum(1), probs.shape[1] - 1).astype(np.int32)


def ideal_drafter_chain(target, p_y, num_drafts: int, *, paths: int, chains: int, rng):
  """``(P(d_1..d_i accepted) for i = 1..num_drafts [num_drafts], mean first-draft acceptance)`` of TiDAR's scheme with
  the ideal independent drafter, for one prefix K.

  ``p_y [V]``: the target's law of the emitted token ``y`` after K; ``target(history [R, i]) -> [R, V]``: the
  target's law of the next position after K + each row's history (``y, x_1 .. x_{i-1}``). Rows ``:paths`` roll out
  the target and estimate the marginal ``q_i`` of position |K| + i as their mean; rows ``paths:`` are acceptance
  chains: ``d_i`` is accepted w.p. ``a_i = sum min(p_i, q_i)`` and, once accepted, distributed as ``min(p_i, q_i) /
  a_i``, so ``P(d_1..d_i accepted) = E[a_1 ... a_i]`` along chains that draw their tokens from those laws.
  """
  import numpy as np
  history = draw(rng, np.tile(p_y, (paths + chains, 1)))[:, None]  # y: rollouts and chains alike follow the target
  prob, out, first = np.ones(chains), np.zeros(num_drafts), 0.0
  for i in range(num_drafts):
    p_now = target(history)
    q = p_now[:paths].mean(0)
    overlap = np.minimum(p_now[paths:], q[None])
    accept = overlap.sum(1)
    prob = prob * accept
    out[i] = prob.mean()
    if i == 0:
      first = float(accept.mean())
    nxt = np.concatenate([draw(rng, p_now[:paths]), draw(rng, overlap / np.maximum(accept[:, None], 1e-30))])
    history = np.concatenate([history, nxt[:, None]], 1)
  return out, first


def measure(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ardiff import data as data_lib
  from ardiff import masks as masks_lib
  from ardiff.sampling import common
  from ardiff.sampling.ar import sample_ar
  from ardiff.sampling.generate import encode_prompt
  from ardiff.training.main import load_run
  from results import PROMPTS

  exp, model, params = load_run(args.run)
  cfg = model.config
  tok = data_lib.make_tokenizer(exp.data.tokenizer)
  V, nb = cfg.vocab_size, args.max_block

  @jax.jit
  def dist_at(tokens, rows):
    """Processed target distributions ``[R, V]`` at position ``rows[r]`` of each causal sequence ``tokens [R, L]``."""
    logits = model.apply({"params": params}, tokens, mask=masks_lib.Causal()).logits
    picked = logits[jnp.arange(tokens.shape[0]), rows]
    return jax.nn.softmax(common.process_logits(picked, mask_token_id=cfg.mask_token_id,
                                                temperature=args.temperature, top_p=args.top_p), -1)

  rng = np.random.default_rng(0)

  prompts = [encode_prompt(tok, PROMPTS[i % len(PROMPTS)]) for i in range(args.num_prompts)]
  width = max(len(x) for x in prompts) + args.new_tokens + nb + 1
  ceil_sum = np.zeros(nb)  # ceil_sum[i] = sum over prefixes of P(d_1..d_i accepted), i = 1..nb-1
  astar, first = [], []
  t0 = time.perf_counter()
  for n, ids in enumerate(prompts):
    res = sample_ar(params, model, np.asarray([ids], np.int32), np.asarray([len(ids)], np.int32),
                    rng=jax.random.key(n), max_new_tokens=args.new_tokens, temperature=args.temperature,
                    top_p=args.top_p)
    seq = np.zeros(width, np.int32)
    seq[:len(ids) + args.new_tokens] = np.concatenate([ids, np.asarray(res.tokens[0])])
    for t in range(len(ids) - 1, len(ids) + args.new_tokens - 1, args.stride):  # K = seq[:t + 1]
      base = np.tile(seq, (V, 1))
      base[:, t + 1:] = 0
      base[:, t + 1] = np.arange(V)  # every y after K
      p_xy = np.asarray(dist_at(jnp.asarray(base), jnp.full((V,), t + 1)))  # [y, x]: p(x | K, y)
      p_y = np.asarray(dist_at(jnp.asarray(base[:1]), jnp.asarray([t])))[0]
      astar.append(best_first_acceptance(p_y, p_xy))
      rows = np.tile(base[0], (args.paths + args.chains, 1))

      def target(history, t=t, rows=rows, p_xy=p_xy):  # p(. | K, history) for each row's history [R, i]
        if history.shape[1] == 1:
          return p_xy[history[:, 0]]  # level 1 needs no forward
        rows[:, t + 1:t + 1 + history.shape[1]] = history
        return np.asarray(dist_at(jnp.asarray(rows), jnp.full((rows.shape[0],), t + history.shape[1])))

      accepted, first_acc = ideal_drafter_chain(target, p_y, nb - 1, paths=args.paths, chains=args.chains, rng=rng)
      ceil_sum[1:] += accepted
      first.append(first_acc)
      print(f"  prompt {n} position {t}: a* {astar[-1]:.3f}, ideal-drafter first acceptance {first[-1]:.3f} "
            f"({time.perf_counter() - t0:.0f} s)", flush=True)
  k = len(astar)
  a = float(np.mean(astar))
  ceiling = {B: 1.0 + float(ceil_sum[1:B].sum() / k) for B in range(2, nb + 1)}
  bound = {B: 1.0 + (B - 1) * a for B in range(2, nb + 1)}
  return dict(run=args.run, temperature=args.temperature, top_p=args.top_p, prefixes=k, paths=args.paths,
              chains=args.chains, best_first_acceptance=a, ideal_first_acceptance=float(np.mean(first)),
              ceiling=ceiling, bound=bound, seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", required=True, help="a TiDAR (or AR) run directory: its causal mode is the target")
  p.add_argument("--max_block", type=int, default=8, help="largest TiDAR block size B to report")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_p", type=float, default=0.9)
  p.add_argument("--num_prompts", type=int, default=4, help="results.py's prompts used (their own samples)")
  p.add_argument("--new_tokens", type=int, default=96, help="sampled tokens per prompt")
  p.add_argument("--stride", type=int, default=16, help="one prefix every STRIDE positions")
  p.add_argument("--paths", type=int, default=128, help="rollouts estimating the marginals")
  p.add_argument("--chains", type=int, default=128, help="acceptance chains per prefix")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  if args.max_block < 2:
    p.error(f"--max_block must be >= 2 (B - 1 drafts per step), got {args.max_block}.")
  from ardiff import host_memory  # before JAX starts, as the other benchmarks
  host_memory.keep_freed_memory()
  out = measure(args)
  print(f"\n{out['run']}, T = {out['temperature']}, top-p {out['top_p']}: {out['prefixes']} prefixes x "
        f"{out['chains']} chains ({out['paths']} rollouts per marginal), {out['seconds']:.0f} s. First-draft "
        f"acceptance: ideal drafter {out['ideal_first_acceptance']:.3f}, best possible {out['best_first_acceptance']:.3f}."
        "\n\n| B | TiDAR tokens/forward, ideal drafter | bound, any drafter |\n|---|---|---|")
  for B in out["ceiling"]:
    print(f"| {B} | {out['ceiling'][B]:.2f} | {out['bound'][B]:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
