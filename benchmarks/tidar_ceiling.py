"""How many tokens per forward would TiDAR reach if its drafter were what its training aims at? TiDAR decoding with an
oracle drafter, simulated with the target itself.

    python benchmarks/tidar_ceiling.py --run runs/results/tidar_b4_ar [--blocks 4,8] [--json out.json]

TiDAR (ardiff/sampling/tidar.py) drafts the next step's tokens in the same forward that verifies the current ones, so
no draft sees the token that the verification emits: with C the committed prefix, a step starts from the emitted
token ``y`` at position |C| and drafts ``d_1..d_{B-1}`` for |C|+1 .. |C|+B-1, each drawn independently from a law
that depends on C alone. TiDAR trains its draft half by cross-entropy on fully masked blocks, so the drafter it aims
at draws each position from its exact marginal under the target, ``q_i(x) = P(x_{|C|+i} = x | C)``.

This script runs TiDAR's decoding loop step by step with that oracle drafter (each marginal estimated from
``--paths`` rollouts of the target from C) and the exact speculative rule: accept ``d_i`` w.p.
``min(1, p_i(d_i) / q_i(d_i))``, a correction from ``norm(max(0, p - q))`` at the first rejection, the bonus from
``p_B`` when all are accepted; the committed prefix grows by ``y`` and the accepted drafts, and the correction or
bonus is the next step's ``y``. The target is the run's AR (causal) mode with the sampler's processing (temperature,
top-p), so the emitted text follows it exactly, as in decoding. Reported per block size: tokens per step and tokens
per forward counted as the sampler counts them (prefill + bootstrap + one per step), averaged over results.py's
prompts. Rollout marginals are noisy mixtures, slightly worse drafts than the exact marginals, so the figures slightly
understate that drafter's. One batched forward per draft position per step: CPU minutes per prompt.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def draw(rng, probs):
  """One index per row of ``probs [R, V]`` (rows summing to 1 up to rounding)."""
  import numpy as np
  c = np.cumsum(probs.astype(np.float64), axis=1)
  u = rng.random((probs.shape[0], 1)) * c[:, -1:]
  return np.minimum((c < u).sum(1), probs.shape[1] - 1).astype(np.int32)


def rollout_marginals(next_dist, prefix, p_first, num_drafts: int, *, paths: int, rng):
  """``[num_drafts, V]``: the laws of positions |prefix|+1 .. |prefix|+num_drafts given ``prefix`` alone, each the
  mean of the target's conditionals over ``paths`` rollouts (``p_first``: the target's law at position |prefix|)."""
  import numpy as np
  n0 = len(prefix)
  rows = np.zeros((paths, n0 + num_drafts), np.int32)
  rows[:, :n0] = prefix
  law, out = np.tile(p_first, (paths, 1)), []
  for i in range(num_drafts):
    rows[:, n0 + i] = draw(rng, law)
    law = next_dist(rows, np.full(paths, n0 + i + 1))
    out.append(law.mean(0))
  return np.stack(out)


def simulate_tidar(next_dist, prompt, *, block_size: int, num_tokens: int, paths: int, rng,
                   context: int = 0, marginals=None) -> dict:
  """TiDAR decoding of ``num_tokens`` after ``prompt`` with the rollout-marginal drafter (module docstring).

  ``next_dist(tokens [R, n], lengths [R]) -> [R, V]``: the target's processed law of position ``lengths[r]`` given
  ``tokens[r, :lengths[r]]``. ``context > 0`` passes only the last ``context`` committed tokens (a target that
  needs no more, e.g. a Markov chain in tests). ``marginals(prefix, p_first, num_drafts, rng)`` replaces
  :func:`rollout_marginals` over ``next_dist`` (the benchmark's: the same rollouts through the model's KV cache).
  Like the sampler, the bootstrap drafts see the first token ``y``. Returns the emitted tokens, the draft+verify
  steps and the accepted drafts.
  """
  import numpy as np
  nd = block_size - 1
  if marginals is None:
    marginals = lambda prefix, p_first, k, rng: rollout_marginals(next_dist, prefix, p_first, k, paths=paths, rng=rng)
  recent = (lambda xs: xs[-context:]) if context else (lambda xs: xs)
  committed = list(prompt)

  def law_after(tokens):
    return next_dist(np.asarray([tokens], np.int32), np.asarray([len(tokens)]))[0]

  y = int(draw(rng, law_after(recent(committed))[None])[0])  # prefill
  # bootstrap forward: the first drafts (positions |C|+1 ..) see y, the first of them is drawn from its exact law
  start = recent(committed + [y])
  first = law_after(start)
  q = first[None] if nd == 1 else np.concatenate([first[None], marginals(start, first, nd - 1, rng)])
  drafts = draw(rng, q)
  emitted, steps, accepted = [y], 0, 0
  while len(emitted) < num_tokens:
    ctx = recent(committed)
    seq = np.asarray(ctx + [y] + drafts.tolist(), np.int32)
    # p[i]: the law of draft i+1's position (p[nd]: the bonus position); one causal forward in decoding
    p = next_dist(np.tile(seq, (nd + 1, 1)), len(ctx) + 1 + np.arange(nd + 1))
    n = 0
    while n < nd and rng.random() < min(1.0, p[n, drafts[n]] / q[n, drafts[n]]):
      n += 1
    if n < nd:  # the correction: the residual of the rejected draft's law
      residual = np.maximum(p[n] - q[n], 0.0)
      y_next = int(draw(rng, (residual / residual.sum())[None])[0])
    else:  # the bonus
      y_next = int(draw(rng, p[nd][None])[0])
    committed += [y] + drafts[:n].tolist()
    emitted += drafts[:n].tolist() + [y_next]
    y, steps, accepted = y_next, steps + 1, accepted + n
    # the next drafts: laws given the committed prefix alone (p[n] is the law at y_next's position)
    q = marginals(recent(committed), p[n], nd, rng)
    drafts = draw(rng, q)
  return dict(tokens=emitted[:num_tokens], steps=steps, accepted=accepted)


def measure(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ardiff import data as data_lib
  from ardiff import masks as masks_lib
  from ardiff.sampling import common
  from ardiff.sampling.common import prefill
  from ardiff.sampling.generate import encode_prompt
  from ardiff.sampling.tidar import sample_tidar
  from ardiff.training.main import load_run
  from results import PROMPTS

  exp, model, params = load_run(args.run)
  cfg = model.config
  tok = data_lib.make_tokenizer(exp.data.tokenizer)
  prompts = [encode_prompt(tok, PROMPTS[i % len(PROMPTS)]) for i in range(args.num_prompts)]
  width = max(len(x) for x in prompts) + args.new_tokens + 2 * max(args.blocks) + 2

  @jax.jit
  def dist_at(tokens, rows):
    logits = model.apply({"params": params}, tokens, mask=masks_lib.Causal()).logits
    picked = logits[jnp.arange(tokens.shape[0]), rows]
    return jax.nn.softmax(common.process_logits(picked, mask_token_id=cfg.mask_token_id,
                                                temperature=args.temperature, top_p=args.top_p), -1)

  def next_dist(tokens, lengths):  # padded to one width: one compile per row count
    padded = np.zeros((tokens.shape[0], width), np.int32)
    padded[:, :tokens.shape[1]] = tokens
    return np.asarray(dist_at(jnp.asarray(padded), jnp.asarray(lengths, jnp.int32) - 1), np.float64)

  @functools.partial(jax.jit, static_argnames=("num_drafts",))
  def cached_rollouts(prefix, length, p_first, key, *, num_drafts):
    """rollout_marginals through the KV cache: prefill the prefix once, then one token per rollout per level."""
    cache, _ = prefill(params, model, prefix, length[None], width + num_drafts + 1, masks_lib.Causal())
    cache = cache.replace(k=jnp.repeat(cache.k, args.paths, axis=1), v=jnp.repeat(cache.v, args.paths, axis=1),
                          lengths=jnp.repeat(cache.lengths, args.paths))
    law, out = jnp.broadcast_to(p_first, (args.paths, p_first.shape[-1])), []
    for _ in range(num_drafts):
      key, sub = jax.random.split(key)
      z = jax.random.categorical(sub, jnp.log(law)).astype(jnp.int32)
      step = model.apply({"params": params}, z[:, None], positions=cache.lengths[:, None], cache=cache,
                         mask=masks_lib.Causal())
      cache = step.cache.advance(1)
      law = jax.nn.softmax(common.process_logits(step.logits[:, 0], mask_token_id=cfg.mask_token_id,
                                                 temperature=args.temperature, top_p=args.top_p), -1)
      out.append(law.mean(0))
    return jnp.stack(out)

  def marginals(prefix, p_first, num_drafts, rng):
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(prefix)] = prefix
    key = jax.random.key(int(rng.integers(2 ** 31)))
    return np.asarray(cached_rollouts(jnp.asarray(padded), jnp.int32(len(prefix)), jnp.asarray(p_first, jnp.float32),
                                      key, num_drafts=num_drafts), np.float64)

  is_tidar = exp.objective.kind == "tidar"
  out = {}
  t0 = time.perf_counter()
  for B in args.blocks:
    sim, real = [], []
    for n, ids in enumerate(prompts):
      r = simulate_tidar(next_dist, ids, block_size=B, num_tokens=args.new_tokens, paths=args.paths,
                         rng=np.random.default_rng(n), marginals=marginals)
      sim.append(r)
      line = (f"  B={B} prompt {n}: oracle drafter {1 + r['accepted'] / r['steps']:.2f} tokens/step, "
              f"{args.new_tokens / (2 + r['steps']):.2f} tokens/forward")
      if is_tidar and B == exp.objective.block_size:  # the trained drafter, at its own block size
        res = sample_tidar(params, model, np.asarray([ids], np.int32), np.asarray([len(ids)], np.int32),
                           rng=jax.random.key(n), max_new_tokens=args.new_tokens, block_size=B,
                           temperature=args.temperature, top_p=args.top_p)
        real.append(dict(steps=int(res.steps), accepted=int(res.accepted[0]), nfe=int(res.nfe)))
        line += (f"; trained drafter {1 + real[-1]['accepted'] / real[-1]['steps']:.2f} tokens/step, "
                 f"{args.new_tokens / real[-1]['nfe']:.2f} tokens/forward")
      print(line + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    row = dict(oracle_tokens_per_step=float(np.mean([1 + r["accepted"] / r["steps"] for r in sim])),
               oracle_tokens_per_forward=float(np.mean([args.new_tokens / (2 + r["steps"]) for r in sim])))
    if real:
      row.update(trained_tokens_per_step=float(np.mean([1 + r["accepted"] / r["steps"] for r in real])),
                 trained_tokens_per_forward=float(np.mean([args.new_tokens / r["nfe"] for r in real])))
    out[B] = row
  return dict(run=args.run, temperature=args.temperature, top_p=args.top_p, prompts=len(prompts),
              new_tokens=args.new_tokens, paths=args.paths, blocks=out, seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", required=True, help="a TiDAR (or AR) run directory: its causal mode is the target")
  p.add_argument("--blocks", default="4", help="TiDAR block sizes B, comma-separated (B - 1 drafts per step)")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_p", type=float, default=0.9)
  p.add_argument("--num_prompts", type=int, default=8, help="the first N of results.py's prompts")
  p.add_argument("--new_tokens", type=int, default=128, help="tokens decoded per prompt")
  p.add_argument("--paths", type=int, default=128, help="rollouts estimating each marginal")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  try:
    args.blocks = sorted({int(b) for b in args.blocks.split(",")})
  except ValueError:
    p.error(f"--blocks must be comma-separated integers, got {args.blocks!r}.")
  if min(args.blocks) < 2:
    p.error(f"every block size must be >= 2 (B - 1 drafts per step), got {args.blocks}.")
  for name, least in (("num_prompts", 1), ("new_tokens", 2), ("paths", 1)):
    if getattr(args, name) < least:
      p.error(f"--{name} must be >= {least}, got {getattr(args, name)}.")
  if not args.temperature > 0 or not 0 < args.top_p <= 1:
    p.error(f"need --temperature > 0 and 0 < --top_p <= 1, got {args.temperature} and {args.top_p}.")
  from ardiff import host_memory  # before JAX starts, as the other benchmarks
  host_memory.keep_freed_memory()
  out = measure(args)
  print(f"\n{out['run']}, T = {out['temperature']}, top-p {out['top_p']}: {out['prompts']} prompts x "
        f"{out['new_tokens']} tokens, {out['paths']} rollouts per marginal, {out['seconds']:.0f} s.\n\n"
        "| B | oracle drafter: tokens/step | tokens/forward | trained drafter: tokens/step | tokens/forward |\n"
        "|---|---|---|---|---|")
  for B, r in out["blocks"].items():
    trained = (f"{r['trained_tokens_per_step']:.2f} | {r['trained_tokens_per_forward']:.2f}"
               if "trained_tokens_per_step" in r else "- | -")
    print(f"| {B} | {r['oracle_tokens_per_step']:.2f} | {r['oracle_tokens_per_forward']:.2f} | {trained} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
