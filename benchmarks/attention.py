"""Attention benchmarks: one function per table, measured side by side in one run.

    python benchmarks/attention.py                      # defaults per backend (CPU: short lengths, interpreter)
    python benchmarks/attention.py --lengths 1024 2048 4096 8192 --batch 1 --heads 8

Block-sparse table (:func:`block_sparse_table`): for the BD3 2L mask, block-causal and causal masks, the Pallas
block-sparse flash kernel (forward, forward+backward) against dense masked attention
(``ardiff.attention.reference_attention`` under ``jax.jit``) of the same shapes, with the ratio next to the mask
density. ``length`` is the full attention length (for BD3: ``2n``, i.e. ``n = length / 2``).

On a CPU host the Pallas kernel runs in the Pallas *interpreter* (default: the GPU/Triton kernel under generic
interpret, which is ~100x faster than the TPU interpreter); the times then say nothing about TPU/GPU speed, only
that the code runs. The XLA dense path is timed natively.
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

from ardiff import attention as attention_lib  # noqa: E402
from ardiff import masks  # noqa: E402
from kernels_pallas import block_sparse_metadata as meta_lib  # noqa: E402
from kernels_pallas.block_sparse_attention import DEFAULT_BLOCKS, block_sparse_attention  # noqa: E402


def _time_ms(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _fwd_bwd(attn):
  def loss(q, k, v):
    return jnp.sum(attn(q, k, v).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _cudnn_attention(mask, length: int):
  """``jax.nn.dot_product_attention(implementation="cudnn")`` with ``mask`` (causal as ``is_causal``, any other
  as a dense boolean mask), or None when cuDNN does not take it (the table then shows n/a)."""
  dense = None if isinstance(mask, masks.Causal) else jnp.asarray(mask.dense(length, length))[None, None]

  def attn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=dense, is_causal=dense is None, implementation="cudnn")
  return attn


def _try_ms(fn, *args, iters: int):
  try:
    return _time_ms(fn, *args, iters=iters)
  except Exception as e:  # noqa: BLE001 - an unsupported cuDNN configuration is a table entry, not a crash
    print(f"  cuDNN: {type(e).__name__}: {' '.join(str(e).split())[:160]}", file=sys.stderr)
    return None


def _masks_for(length: int, bd3_block: int, block_causal: int):
  return [("bd3_2L", masks.BD3(length // 2, bd3_block)), ("block_causal", masks.BlockCausal(block_causal)),
          ("causal", masks.Causal())]


def block_sparse_table(args) -> list[dict]:
  """Rows of the block-sparse kernel vs dense XLA table (one row per mask and length)."""
  platform = jax.default_backend()
  backend = args.kernel_backend or (platform if platform in ("tpu", "gpu") else "gpu")
  interpret = platform not in ("tpu", "gpu")
  block = args.block or DEFAULT_BLOCKS[backend]
  dtype = jnp.dtype(args.dtype)
  rows = []
  for length in args.lengths:
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (args.batch, length, args.heads, args.head_dim), dtype)
    k = jax.random.normal(ks[1], (args.batch, length, args.kv_heads, args.head_dim), dtype)
    v = jax.random.normal(ks[2], (args.batch, length, args.kv_heads, args.head_dim), dtype)
    for name, mask in _masks_for(length, args.bd3_block, args.block_causal):
      kern = lambda q, k, v, mask=mask: block_sparse_attention(  # noqa: E731
          q, k, v, mask=mask, block_q=block, block_kv=block, backend=backend, interpret=interpret)
      dense = lambda q, k, v, mask=mask: attention_lib.reference_attention(q, k, v, mask=mask)  # noqa: E731
      meta = meta_lib.build_metadata(mask, length, length, block, block)
      row = dict(mask=name, length=length, density=mask.density(length, length), tile_density=meta.tile_density)
      row["kernel_fwd_ms"] = _time_ms(jax.jit(kern), q, k, v, iters=args.iters)
      row["dense_fwd_ms"] = _time_ms(jax.jit(dense), q, k, v, iters=args.iters)
      row["kernel_fwdbwd_ms"] = _time_ms(_fwd_bwd(kern), q, k, v, iters=args.iters)
      row["dense_fwdbwd_ms"] = _time_ms(_fwd_bwd(dense), q, k, v, iters=args.iters)
      if platform == "gpu":  # cuDNN fused attention exists only on NVIDIA GPUs
        cudnn = _cudnn_attention(mask, length)
        row["cudnn_fwd_ms"] = _try_ms(jax.jit(cudnn), q, k, v, iters=args.iters)
        row["cudnn_fwdbwd_ms"] = _try_ms(_fwd_bwd(cudnn), q, k, v, iters=args.iters)
      rows.append(row)
      print(f"  measured {name} L={length}", file=sys.stderr, flush=True)
  mode = (f"Pallas INTERPRETER on {platform} ({backend} kernel, interpret=True): kernel times are NOT "
          f"representative of {backend.upper()} speed" if interpret else f"compiled {backend} kernel")
  print(f"\nBlock-sparse flash attention vs dense XLA (reference_attention under jit) — {mode}")
  print(f"batch={args.batch} heads={args.heads} kv_heads={args.kv_heads} head_dim={args.head_dim} "
        f"dtype={args.dtype} tiles={block}x{block} bd3_block={args.bd3_block} block_causal={args.block_causal} "
        f"median of {args.iters}")
  hdr = (f"{'mask':<13}{'L':>6}{'density':>9}{'tiles':>7}{'kern fwd':>10}{'dense fwd':>11}{'ratio':>7}"
         f"{'kern f+b':>10}{'dense f+b':>11}{'ratio':>7}")
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    print(f"{r['mask']:<13}{r['length']:>6}{r['density']:>9.3f}{r['tile_density']:>7.3f}"
          f"{r['kernel_fwd_ms']:>8.2f}ms{r['dense_fwd_ms']:>9.2f}ms"
          f"{r['kernel_fwd_ms'] / r['dense_fwd_ms']:>7.2f}"
          f"{r['kernel_fwdbwd_ms']:>8.2f}ms{r['dense_fwdbwd_ms']:>9.2f}ms"
          f"{r['kernel_fwdbwd_ms'] / r['dense_fwdbwd_ms']:>7.2f}")
  print("ratio = kernel / dense (lower is better); density = allowed fraction of the mask; tiles = fraction of "
        "(q, kv) tiles the kernel visits")
  if platform == "gpu":
    ms = lambda x: f"{x:8.2f}ms" if x is not None else f"{'n/a':>10}"  # noqa: E731
    ratio = lambda a, b: f"{a / b:7.2f}" if b else f"{'n/a':>7}"  # noqa: E731
    print(f"\nTriton kernel vs cuDNN (jax.nn.dot_product_attention(implementation='cudnn'), same masks)")
    hdr = f"{'mask':<13}{'L':>6}{'cudnn fwd':>10}{'ratio':>7}{'cudnn f+b':>10}{'ratio':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
      print(f"{r['mask']:<13}{r['length']:>6}{ms(r['cudnn_fwd_ms'])}{ratio(r['kernel_fwd_ms'], r['cudnn_fwd_ms'])}"
            f"{ms(r['cudnn_fwdbwd_ms'])}{ratio(r['kernel_fwdbwd_ms'], r['cudnn_fwdbwd_ms'])}")
    print("ratio = Triton kernel / cuDNN (lower is better)")
  return rows


def parse_args(argv=None):
  on_accel = jax.default_backend() in ("tpu", "gpu")
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192] if on_accel else [256, 512],
                 help="attention lengths (BD3: 2n)")
  p.add_argument("--batch", type=int, default=4 if on_accel else 1)
  p.add_argument("--heads", type=int, default=8 if on_accel else 2)
  p.add_argument("--kv-heads", type=int, default=None, help="default: heads")
  p.add_argument("--head-dim", type=int, default=128 if on_accel else 64)
  p.add_argument("--dtype", default="bfloat16" if on_accel else "float32")
  p.add_argument("--block", type=int, default=None, help="kernel tile (block_q = block_kv); default per backend")
  p.add_argument("--bd3-block", type=int, default=16)
  p.add_argument("--block-causal", type=int, default=64)
  p.add_argument("--kernel-backend", choices=["tpu", "gpu"], default=None,
                 help="which Pallas kernel (on CPU it runs in the interpreter; default gpu there)")
  p.add_argument("--iters", type=int, default=10 if on_accel else 3)
  args = p.parse_args(argv)
  args.kv_heads = args.kv_heads or args.heads
  return args


def main(argv=None):
  args = parse_args(argv)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()[0].device_kind}")
  block_sparse_table(args)
  # decode_attention_table(args) — added by the decode-kernel owner.


if __name__ == "__main__":
  main()
