"""What a cached forward costs per query row on this device: the economics behind "tokens/s vs AR" of every
draft-and-verify or parallel sampler.

    python benchmarks/forward_cost.py --run runs/results/ar [--rows 1,2,3,5,8,12,20,36,72] [--cache 256]

A sampler step that forwards ``T`` query rows over a KV cache and commits ``n`` tokens beats AR decoding (one row,
one token per forward) by ``n / (cost(T) / cost(1))``, before its own sampling and bookkeeping. Memory-bound devices
(accelerators at batch 1, weights streamed once per forward) have ``cost(T) ~ cost(1)`` for T up to hundreds; a CPU
running a small model is compute- and dispatch-bound, so ``cost(T)`` grows with ``T``. This script measures
``cost(T)`` for the run's model (``--n`` forwards inside one jitted loop over a cache of ``--cache`` committed
tokens, median of ``--repeats`` calls, the row counts timed in turn), prints it as a ratio to one row, and for
each ratio the tokens per forward a sampler with that many rows needs to reach 1.5x AR tokens/s:
``1.5 * cost(T) / cost(1)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def forward_loop(params, model, *, rows: int, cache_len: int, n: int):
  """A compiled call running ``n`` causal forwards of ``rows`` query tokens after ``cache_len`` cached tokens."""
  import jax
  import jax.numpy as jnp

  from ardiff import masks as masks_lib
  from ardiff.sampling.common import prefill

  prompt = jnp.ones((1, cache_len), jnp.int32)
  cache, _ = jax.jit(lambda p: prefill(p, model, prompt, jnp.asarray([cache_len]), cache_len + rows,
                                       masks_lib.Causal()))(params)

  @jax.jit
  def loop(p, cache):
    def body(i, carry):
      # The cache is carried, as the samplers carry it, so its K/V writes happen in place; the token ids depend on
      # the carry and every logit is summed, so XLA can neither hoist the forward out of the loop nor trim its rows.
      acc, cache = carry
      tokens = jnp.full((1, rows), 3, jnp.int32) + (acc > 1e30).astype(jnp.int32)
      positions = cache.lengths[:, None] + jnp.arange(rows)[None]
      out = model.apply({"params": p}, tokens, positions=positions, cache=cache, mask=masks_lib.Causal())
      return acc + jnp.sum(out.logits), out.cache
    return jax.lax.fori_loop(0, n, body, (jnp.float32(0), cache))[0]

  loop(params, cache).block_until_ready()  # compile
  return lambda: loop(params, cache).block_until_ready()


def forward_ms(params, model, *, rows, cache_len: int, n: int, repeats: int) -> dict:
  """``{rows: median ms of one forward}``, the row counts timed in turn within each repeat (so that a slow phase of a
  shared machine hits them all alike, not whichever was being timed)."""
  import numpy as np
  calls = {r: forward_loop(params, model, rows=r, cache_len=cache_len, n=n) for r in rows}
  times = {r: [] for r in rows}
  for _ in range(repeats):
    for r, call in calls.items():
      t0 = time.perf_counter()
      call()
      times[r].append((time.perf_counter() - t0) / n * 1e3)
  return {r: float(np.median(t)) for r, t in times.items()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run", required=True, help="a run directory (its model is timed; weights do not matter)")
  p.add_argument("--rows", default="1,2,3,5,8,12,20,36,72", help="query rows per forward, comma-separated")
  p.add_argument("--cache", type=int, default=256, help="committed tokens in the KV cache")
  p.add_argument("--n", type=int, default=100, help="forwards per timed call")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  try:
    rows = [int(r) for r in args.rows.split(",")]
  except ValueError:
    p.error(f"--rows must be comma-separated integers, got {args.rows!r}.")
  for name in ("cache", "n", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
  if not rows or min(rows) < 1 or 1 not in rows:
    p.error(f"--rows must be positive and include 1 (the AR step it compares to), got {args.rows!r}.")
  from ardiff import host_memory  # before JAX starts, as the other benchmarks
  host_memory.keep_freed_memory()
  import jax

  from ardiff.training.main import load_run
  exp, model, params = load_run(args.run)
  cost = forward_ms(params, model, rows=rows, cache_len=args.cache, n=args.n, repeats=args.repeats)
  m = exp.model
  print(f"{args.run}: {m.num_layers} layers x {m.embed_dim}, vocabulary {model.config.vocab_size}, cache "
        f"{args.cache} tokens, batch 1, {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs visible\n\n| query rows | ms / forward | x one row | tokens/forward for 1.5x AR |"
        "\n|---|---|---|---|")
  for r in rows:
    ratio = cost[r] / cost[1]
    print(f"| {r} | {cost[r]:.3f} | {ratio:.2f} | {1.5 * ratio:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
