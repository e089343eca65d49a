"""What a cached forward costs per query row on this device: the economics behind "tokens/s vs AR" of every
draft-and-verify or parallel sampler.

    python benchmarks/forward_cost.py --run runs/results/ar [--rows 1,2,3,5,8,12,20,36,72] [--cache 256]

A sampler step that forwards ``T`` query rows over a KV cache and commits ``n`` tokens beats AR decoding (one row,
one token per forward) by ``n / (cost(T) / cost(1))``, before its own sampling and bookkeeping. Memory-bound devices
(accelerators at batch 1, weights streamed once per forward) have ``cost(T) ~ cost(1)`` for T up to hundreds; a CPU
running a small model is compute- and dispatch-bound, so ``cost(T)`` grows with ``T``. This script measures
``cost(T)`` for the run's model (``--n`` forwards inside one jitted loop over a cache of ``--cache`` committed
tokens, median of ``--repeats``), prints it as a ratio to one row, and for each ratio the tokens per forward a
sampler with that many rows needs to reach 1.5x AR tokens/s: ``1.5 * cost(T) / cost(1)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def forward_ms(params, model, *, rows: int, cache_len: int, n: int, repeats: int) -> float:
  """Median milliseconds of one causal forward of ``rows`` query tokens after ``cache_len`` cached tokens."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ardiff import masks as masks_lib
  from ardiff.sampling.common import prefill

  prompt = jnp.ones((1, cache_len), jnp.int32)
  cache, _ = jax.jit(lambda p: prefill(p, model, prompt, jnp.asarray([cache_len]), cache_len + rows,
                                       masks_lib.Causal()))(params)

  @jax.jit
  def loop(p, cache):
    def body(i, acc):  # the token ids depend on the carry, so XLA cannot hoist the forward out of the loop
      tokens = jnp.full((1, rows), 3, jnp.int32) + (acc > 1e30).astype(jnp.int32)
      positions = cache.lengths[:, None] + jnp.arange(rows)[None]
      out = model.apply({"params": p}, tokens, positions=positions, cache=cache, mask=masks_lib.Causal())
      return acc + out.logits[0, -1, 0]
    return jax.lax.fori_loop(0, n, body, jnp.float32(0))

  loop(params, cache).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    loop(params, cache).block_until_ready()
    times.append((time.perf_counter() - t0) / n * 1e3)
  return float(np.median(times))


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
  if not rows or min(rows) < 1 or 1 not in rows:
    p.error(f"--rows must be positive and include 1 (the AR step it compares to), got {args.rows!r}.")
  from ardiff import host_memory  # before JAX starts, as the other benchmarks
  host_memory.keep_freed_memory()
  import jax

  from ardiff.training.main import load_run
  exp, model, params = load_run(args.run)
  cost = {r: forward_ms(params, model, rows=r, cache_len=args.cache, n=args.n, repeats=args.repeats) for r in rows}
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
