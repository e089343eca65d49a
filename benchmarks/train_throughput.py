"""Train-step throughput, side by side in one process: ardiff (JAX) vs a compact PyTorch twin of the same model.

    python benchmarks/train_throughput.py                       # issue shape + a larger one, 30 steps (median)
    python benchmarks/train_throughput.py --shapes issue --steps 10 --no_torch

Model (both sides): Llama-style decoder, RMSNorm, RoPE, SwiGLU, vocab 259 (bytes + BOS/EOS/MASK), float32.
Shapes: ``issue`` = 4 layers, d = 128, 4 heads, MLP 344 (the parameter count of a d = 128 GELU-512 MLP), batch 16,
seq 128 (BD3: 2L = 256 positions), block 4; ``larger`` = 6 layers, d = 256, 8 heads, MLP 688, batch 8, seq 256.

Each step is forward + backward + AdamW. ardiff runs its real objectives (``make_loss_fn``) under one jit with
donated state; the PyTorch twin (eager, ``F.scaled_dot_product_attention`` with a precomputed boolean BD3 mask, as
the BD3-LM reference does on CPU, ``torch.optim.AdamW``) computes the same losses: AR next-token CE; BD3 with one
t per block, [MASK] noise, logits on the noisy half only, 1/t weights. Torch's thread count is set to jax's CPU
parallelism (the CPUs this process may run on); both sides are timed *interleaved* (one step of each in turn), so
a shared machine's contention hits both equally; medians after compile and warm-up. On a machine busy with
other jobs, pin to one core (``taskset -c 1 python benchmarks/train_throughput.py``): with more threads than
free cores, torch's OpenMP threads wait on each other (its step measured 4.5-7.5x slower than pinned), jax's less.

The breakdown times each component alone (forward + backward, all layers): attention (q, k, v -> out), MLP,
loss (final projection + log-softmax + NLL on the positions that carry loss), optimizer (one AdamW update).
Torch is optional: without it its rows are skipped with a message. The ardiff step's temporaries (XLA's buffer
assignment) are printed too: XLA:CPU allocates them once per execution, larger than a glibc thread arena's heap, so
by default glibc maps them afresh and every page is faulted in again each step (AR 88 of 335 ms, BD3 171 of 722 ms,
one core). The benchmark first sets what ``python -m ardiff train`` sets on a CPU (``ardiff.host_memory``: one
arena, no mmap chunks, freed pages kept), for both codebases alike since they share the process;
``--glibc_malloc_defaults`` measures without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from ardiff import host_memory  # noqa: E402

# Before `import jax`, whose import starts a thread (ardiff.host_memory says why that matters): what
# `python -m ardiff train` sets on a CPU host, for both codebases alike (they share this process).
if __name__ == "__main__" and "--glibc_malloc_defaults" not in sys.argv[1:]:
  HOST_MEMORY = host_memory.keep_freed_memory()
else:
  HOST_MEMORY = (False, "not set: --glibc_malloc_defaults, or imported as a module")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ardiff import attention as attention_lib  # noqa: E402
from ardiff import masks  # noqa: E402
from ardiff.config import ModelConfig  # noqa: E402
from ardiff.model import Mlp, Transformer, init_params  # noqa: E402
from ardiff.objectives import ObjectiveConfig, base, make_loss_fn  # noqa: E402

try:
  import torch  # noqa: E402
  import torch_twin  # noqa: E402  (benchmarks/torch_twin.py)
except ImportError as e:  # torch is a dev-only dependency
  torch, torch_twin, TORCH_MISSING = None, None, str(e)

VOCAB, MASK_ID, BLOCK = 259, 258, 4


@dataclasses.dataclass(frozen=True)
class Shape:
  layers: int
  d: int
  heads: int
  mlp: int
  batch: int
  seq: int


SHAPES = {"issue": Shape(4, 128, 4, 344, 16, 128), "larger": Shape(6, 256, 8, 688, 8, 256)}


def model_config(s: Shape) -> ModelConfig:
  return ModelConfig(vocab_size=VOCAB, embed_dim=s.d, num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.heads,
                     head_dim=s.d // s.heads, mlp_dim=s.mlp, mask_token_id=MASK_ID)


def _timer(fn):
  """``fn() -> array``; returns a callable that runs it once and returns the seconds it took."""
  def run():
    t0 = time.perf_counter()
    out = fn()
    if out is not None:
      jax.block_until_ready(out)
    return time.perf_counter() - t0
  return run


def jax_step(s: Shape, kind: str):
  cfg = model_config(s)
  obj = ObjectiveConfig(kind="ar") if kind == "AR" else ObjectiveConfig(kind="block_diffusion", block_size=BLOCK)
  params = init_params(cfg, jax.random.PRNGKey(0))
  tx = optax.adamw(1e-3, weight_decay=0.01)
  grad_fn = jax.value_and_grad(make_loss_fn(Transformer(cfg), obj), has_aux=True)

  def step(params, opt_state, batch, rng):
    (loss, _), grads = grad_fn(params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(0, 256, (s.batch, s.seq), dtype=np.int32))}
  state = {"p": params, "o": tx.init(params), "i": 0}
  compiled = step.lower(state["p"], state["o"], batch, jax.random.PRNGKey(0)).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes  # the step's temporaries (XLA:CPU: one arena per execution)

  def run():
    state["i"] += 1
    state["p"], state["o"], loss = compiled(state["p"], state["o"], batch, jax.random.PRNGKey(state["i"]))
    return loss
  run.temp_bytes = temp
  return run


def jax_components(s: Shape, kind: str) -> dict:
  """name -> zero-arg callable running that component's forward + backward (all layers)."""
  cfg = model_config(s)
  positions = s.seq if kind == "AR" else 2 * s.seq
  mask = masks.Causal() if kind == "AR" else masks.BD3(s.seq, BLOCK)
  hd = s.d // s.heads
  rng = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k, v = (arr(s.batch, positions, s.heads, hd) for _ in range(3))
  seg = jnp.ones((s.batch, positions), jnp.int32)
  attn = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention_lib.attention(
      q, k, v, mask=mask, impl="xla", q_segment_ids=seg, kv_segment_ids=seg) ** 2), (0, 1, 2)))
  mlp_mod = Mlp(cfg)
  x = arr(s.batch, positions, s.d)
  mlp_params = mlp_mod.init(jax.random.PRNGKey(0), x)
  mlp = jax.jit(jax.grad(lambda p, x: jnp.sum(mlp_mod.apply(p, x) ** 2), (0, 1)))
  h = arr(s.batch, s.seq, s.d)
  w = arr(s.d, VOCAB) * 0.02
  targets = jnp.asarray(rng.integers(0, 256, (s.batch, s.seq)), jnp.int32)
  loss = jax.jit(jax.grad(lambda w, h: jnp.sum(base.token_nll(h @ w, targets, MASK_ID)), (0, 1)))
  params = init_params(cfg, jax.random.PRNGKey(0))
  tx = optax.adamw(1e-3, weight_decay=0.01)
  grads = jax.tree.map(jnp.ones_like, params)
  opt = jax.jit(lambda g, o, p: tx.update(g, o, p))
  opt_state = tx.init(params)
  n = s.layers
  return {"attention": lambda: [attn(q, k, v) for _ in range(n)][-1],
          "MLP": lambda: [mlp(mlp_params, x) for _ in range(n)][-1],
          "loss": lambda: loss(w, h), "optimizer": lambda: opt(grads, opt_state, params)}


def median_times(runners: dict, steps: int, warmup: int = 2) -> dict:
  """Interleaved: every runner once per round, ``warmup`` untimed rounds first."""
  timers = {k: _timer(f) for k, f in runners.items()}
  for _ in range(warmup):
    for t in timers.values():
      t()
  times = {k: [] for k in timers}
  for _ in range(steps):
    for k, t in timers.items():
      times[k].append(t())
  return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default="issue,larger", help=f"comma-separated, from {','.join(SHAPES)}")
  p.add_argument("--steps", type=int, default=30, help="timed steps per row (median reported)")
  p.add_argument("--no_torch", action="store_true", help="ardiff rows only")
  p.add_argument("--no_breakdown", action="store_true", help="skip the per-component breakdown")
  p.add_argument("--glibc_malloc_defaults", action="store_true",
                 help="leave glibc's malloc as it is (default: what `python -m ardiff train` sets on a CPU, "
                      "ardiff.host_memory; it applies to both codebases, which share this process)")
  args = p.parse_args(argv)
  applied, why = HOST_MEMORY  # set at import, before jax (above)
  print(f"host memory: {why}" if applied else f"host memory: glibc malloc defaults ({why}): each step's XLA:CPU "
        "temporaries are mapped and faulted in anew")
  shapes = [x.strip() for x in args.shapes.split(",") if x.strip()]
  for x in shapes:
    if x not in SHAPES:
      p.error(f"unknown shape {x!r}; choose from {', '.join(SHAPES)}")
  use_torch = torch is not None and not args.no_torch
  dev = jax.devices()[0]
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"device: {dev.platform} ({dev.device_kind}); {threads} CPU threads available; steps={args.steps} (median, "
        f"interleaved)")
  if use_torch:
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}: torch.set_num_threads({threads}) (= the CPUs jax's CPU client may use)")
  elif torch is None:
    print(f"torch not installed ({TORCH_MISSING}): PyTorch rows skipped (pip install -r requirements-dev.txt)")

  for name in shapes:
    s = SHAPES[name]
    cfg = model_config(s)
    print(f"\n== {name}: {s.layers} layers, d={s.d}, {s.heads} heads, MLP {s.mlp}, batch {s.batch}, seq {s.seq} "
          f"(BD3: 2L={2 * s.seq}, block {BLOCK}), f32; ardiff params {cfg.num_params() / 1e6:.3f}M")
    runners = {}
    for kind in ("AR", "BD3"):
      runners[("ardiff", kind)] = jax_step(s, kind)
      if use_torch:
        runners[("torch", kind)] = torch_twin.train_step(s, kind, vocab=VOCAB, mask_id=MASK_ID, block=BLOCK)
    if use_torch:
      print(f"torch twin params {torch_twin.num_params(s, VOCAB) / 1e6:.3f}M")
    med = median_times(runners, args.steps)
    header = f"{'codebase':<10} {'AR ms/step':>11} {'AR tok/s':>9} {'BD3 ms/step':>12} {'BD3 tok/s':>10} {'BD3/AR':>7}"
    print(header)
    print("-" * len(header))
    for side in ("torch", "ardiff"):
      if (side, "AR") not in med:
        continue
      ar, bd3 = med[(side, "AR")], med[(side, "BD3")]
      toks = s.batch * s.seq
      print(f"{side:<10} {ar * 1e3:>11.1f} {toks / ar:>9.0f} {bd3 * 1e3:>12.1f} {toks / bd3:>10.0f} "
            f"{bd3 / ar:>6.2f}x")
    print("ardiff step temporaries: " + ", ".join(
        f"{kind} {runners[('ardiff', kind)].temp_bytes / 2**20:.0f} MiB" for kind in ("AR", "BD3"))
          + " (XLA:CPU allocates them every step; ardiff.host_memory keeps their pages mapped between steps)")
    if use_torch:
      print(f"ardiff/torch: AR {med[('ardiff', 'AR')] / med[('torch', 'AR')]:.2f}x, "
            f"BD3 {med[('ardiff', 'BD3')] / med[('torch', 'BD3')]:.2f}x (< 1: ardiff faster)")
    if args.no_breakdown:
      continue
    comps = {}
    for kind in ("AR", "BD3"):
      for c, f in jax_components(s, kind).items():
        comps[("ardiff", kind, c)] = f
      if use_torch:
        for c, f in torch_twin.components(s, kind, vocab=VOCAB, mask_id=MASK_ID, block=BLOCK).items():
          comps[("torch", kind, c)] = f
    cm = median_times(comps, max(3, args.steps // 3))
    print(f"breakdown, ms (each component alone, forward + backward, all layers):")
    names = ("attention", "MLP", "loss", "optimizer")
    print(f"{'':<14}" + "".join(f"{n:>11}" for n in names))
    for kind in ("AR", "BD3"):
      for side in ("torch", "ardiff"):
        if (side, kind, "MLP") in cm:
          print(f"{side + ' ' + kind:<14}" + "".join(f"{cm[(side, kind, n)] * 1e3:>11.1f}" for n in names))
  return 0


if __name__ == "__main__":
  sys.exit(main())
