"""Train-step throughput: AR vs BD3 (block diffusion) at a few model sizes, same batch and sequence length.

    python benchmarks/train_throughput.py                                  # CPU-sized defaults (~1-2 min, 2 cores)
    python benchmarks/train_throughput.py --sizes small,base --seq_len 512 --batch 16 --steps 20 --peak_tflops 459

Each row times one jitted ``value_and_grad(loss) + optax.adamw update`` step (donated params/opt state), after
compilation and one warm-up step, as the median of ``--steps`` steps, and reports tokens/s counted on the *input*
tokens (``batch * seq_len``), so AR and BD3 rows are directly comparable: ``BD3/AR cost`` is the step time of BD3
divided by the AR step time at the same size (BD3 runs the transformer on ``[x_t, x_0]``, i.e. ``2 * seq_len``
positions, so expect ~2x or more).

MFU (model FLOPs utilisation) is printed when ``--peak_tflops`` is given (peak dense FLOP/s of one device, in
TFLOP/s, for the compute dtype; e.g. TPU v5p bf16 459, H100 SXM bf16 989); it is ``n/a`` otherwise (and on CPU).
Model FLOPs per step = ``6 * N_matmul * P + 12 * layers * heads * head_dim * P**2`` per sequence, times batch,
where ``P`` is the number of positions the transformer sees (``seq_len`` for AR, ``2 * seq_len`` for BD3) and the
attention term counts the full dense score matrix that the XLA path computes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ardiff.config import ModelConfig  # noqa: E402
from ardiff.model import Transformer, init_params  # noqa: E402
from ardiff.objectives import ObjectiveConfig, make_loss_fn  # noqa: E402

VOCAB = 259  # byte tokenizer: 256 bytes, BOS, EOS, MASK
MASK_ID = 258

# name -> (embed_dim, num_layers, num_heads, head_dim, mlp_dim)
SIZES = {
    "tiny": (128, 4, 4, 32, 384),      # configs/default.py (~0.9M params)
    "small": (256, 6, 8, 32, 768),
    "medium": (384, 8, 12, 32, 1152),
    "base": (768, 12, 12, 64, 2048),
}

OBJECTIVES = [
    ("AR", ObjectiveConfig(kind="ar")),
    ("BD3 b4", ObjectiveConfig(kind="block_diffusion", block_size=4)),
    ("BD3 b16", ObjectiveConfig(kind="block_diffusion", block_size=16)),
]


def model_config(size: str, dtype: str) -> ModelConfig:
  d, layers, heads, hd, mlp = SIZES[size]
  return ModelConfig(vocab_size=VOCAB, embed_dim=d, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                     head_dim=hd, mlp_dim=mlp, mask_token_id=MASK_ID, dtype=dtype)


def model_flops_per_step(cfg: ModelConfig, batch: int, positions: int) -> float:
  embed_lookup = cfg.vocab_size * cfg.embed_dim  # a gather, not a matmul
  n_matmul = cfg.num_params() - embed_lookup
  attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * positions ** 2
  return batch * (6 * n_matmul * positions + attn)


def time_train_step(cfg: ModelConfig, obj: ObjectiveConfig, *, batch: int, seq_len: int, steps: int,
                    seed: int = 0) -> float:
  """Median seconds per train step (compile and one warm-up step excluded)."""
  model = Transformer(cfg)
  params = init_params(cfg, jax.random.PRNGKey(seed))
  tx = optax.adamw(1e-3, weight_decay=0.01)
  opt_state = tx.init(params)
  loss_fn = make_loss_fn(model, obj)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(params, opt_state, batch_, rng):
    (loss, _), grads = grad_fn(params, batch_, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  tokens = np.random.default_rng(seed).integers(0, 256, size=(batch, seq_len), dtype=np.int32)
  batch_ = {"tokens": jnp.asarray(tokens)}
  rng = jax.random.PRNGKey(seed + 1)
  params, opt_state, loss = step(params, opt_state, batch_, rng)  # compile
  jax.block_until_ready(loss)
  params, opt_state, loss = step(params, opt_state, batch_, rng)  # warm-up
  jax.block_until_ready(loss)
  times = []
  for i in range(steps):
    rng_i = jax.random.fold_in(rng, i)
    t0 = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batch_, rng_i)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"non-finite loss {float(loss)} for {obj.kind} at {cfg}")
  return statistics.median(times)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="tiny,small", help=f"comma-separated, from {','.join(SIZES)}")
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=3, help="timed steps per row (median reported)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="peak dense TFLOP/s of one device for --dtype; enables the MFU column")
  args = p.parse_args(argv)

  sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
  for s in sizes:
    if s not in SIZES:
      p.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
  for _, obj in OBJECTIVES:
    obj.check_seq_len(args.seq_len)

  dev = jax.devices()[0]
  peak = args.peak_tflops * 1e12 if args.peak_tflops else None
  if dev.platform == "cpu" and peak is not None:
    print("note: --peak_tflops ignored on CPU (MFU n/a)")
    peak = None
  print(f"device: {dev.platform} ({dev.device_kind}), 1 device used; batch={args.batch} seq_len={args.seq_len} "
        f"dtype={args.dtype} steps={args.steps} (median)")

  header = f"{'size':<8} {'params':>8} {'objective':<9} {'ms/step':>9} {'tokens/s':>10} {'BD3/AR cost':>11} {'MFU':>7}"
  print(header)
  print("-" * len(header))
  for size in sizes:
    cfg = model_config(size, args.dtype)
    ar_time = None
    for name, obj in OBJECTIVES:
      t = time_train_step(cfg, obj, batch=args.batch, seq_len=args.seq_len, steps=args.steps)
      positions = args.seq_len if obj.kind == "ar" else 2 * args.seq_len
      if obj.kind == "ar":
        ar_time = t
      ratio = "1.00x" if obj.kind == "ar" else f"{t / ar_time:.2f}x"
      mfu = "n/a" if peak is None else f"{model_flops_per_step(cfg, args.batch, positions) / t / peak:.1%}"
      print(f"{size:<8} {cfg.num_params() / 1e6:>7.2f}M {name:<9} {t * 1e3:>9.1f} "
            f"{args.batch * args.seq_len / t:>10.0f} {ratio:>11} {mfu:>7}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
