"""Decode attention (Pallas) vs the dense XLA reference, side by side.

    python benchmarks/decode_attention.py            # on TPU/GPU: compiled kernels, cache lengths 1k..8k
    python benchmarks/decode_attention.py --small    # on CPU: interpret mode, small shapes

Each row: batch rows filled to ``fill`` of ``max_len`` (ragged: lengths spread from fill/2 to fill), T new queries,
BlockCausal(T) mask for T > 1 (a diffusion block), Causal for T = 1. Reported: kernel and reference times (median
of ``--iters`` after warm-up), ratio ref/kernel, and on TPU/GPU the achieved bandwidth over the valid K/V prefix
(bytes the kernel must read / time) as a fraction of the chip's peak HBM bandwidth. On CPU the kernel runs in
the Pallas interpreter, so its time says nothing about TPU/GPU speed (the table says so).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_HBM_GBPS = {  # per chip / device, GB/s
    "TPU v4": 1200, "TPU v5 lite": 819, "TPU v5e": 819, "TPU v5p": 2765, "TPU v5": 2765, "TPU v6 lite": 1640,
    "TPU v6e": 1640, "NVIDIA H100": 3350, "NVIDIA H100 80GB HBM3": 3350, "NVIDIA H200": 4800, "NVIDIA A100": 2039,
}


def _peak(kind: str):
  for name, gbps in sorted(PEAK_HBM_GBPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name):
      return gbps
  return None


def _time(fn, args, iters):
  import jax
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  ts.sort()
  return ts[len(ts) // 2]


def decode_attention_table(*, small: bool, iters: int, batch: int, heads: int, kv_heads: int, head_dim: int,
                           dtype: str, fill: float = 0.5):
  """Prints the table; returns its rows as dicts."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ardiff import attention as attention_lib
  from ardiff import masks
  from kernels_pallas import decode_attention as da

  platform = jax.default_backend()
  interpret = platform not in ("tpu", "gpu")
  backend = "gpu" if interpret else platform  # on CPU: the GPU kernel in generic interpret mode (the fast one)
  kind = jax.devices()[0].device_kind
  peak = None if interpret else _peak(kind)
  lens = (256, 512) if small else (1024, 2048, 4096, 8192)
  dt = jnp.dtype(dtype)
  print(f"# decode_attention vs dense reference on {platform} ({kind}); batch={batch} heads={heads} "
        f"kv_heads={kv_heads} head_dim={head_dim} dtype={dtype} fill={fill}")
  if interpret:
    print("# CPU: the Pallas kernel ran in INTERPRET mode (backend='gpu', interpret=True); its time is not a "
          "kernel speed, bandwidth is not reported.")
  print(f"{'max_len':>8} {'T':>3} {'kernel_ms':>10} {'ref_ms':>9} {'ref/kern':>8} {'valid_MB':>9} {'GB/s':>8} "
        f"{'%peak':>6}")
  rows = []
  rng = np.random.default_rng(0)
  for s in lens:
    for t in (1, 16):
      mask = masks.Causal() if t == 1 else masks.BlockCausal(t)
      q = jnp.asarray(rng.standard_normal((batch, t, heads, head_dim)), dt)
      kc = jnp.asarray(rng.standard_normal((batch, s, kv_heads, head_dim)), dt)
      vc = jnp.asarray(rng.standard_normal((batch, s, kv_heads, head_dim)), dt)
      lengths = np.linspace(fill * s / 2, fill * s, batch).astype(np.int32) - t
      lengths = jnp.asarray(np.clip(lengths, 0, s - t), jnp.int32)
      kvl = lengths + t
      kern = jax.jit(lambda q, k, v, o, l, mask=mask: da.decode_attention(
          q, k, v, q_offsets=o, kv_lengths=l, mask=mask, backend=backend, interpret=interpret))
      ref = jax.jit(lambda q, k, v, o, l, mask=mask: attention_lib.reference_attention(
          q, k, v, mask=mask, q_offsets=o, kv_lengths=l))
      args = (q, kc, vc, lengths, kvl)
      err = float(jnp.max(jnp.abs(kern(*args).astype(jnp.float32) - ref(*args).astype(jnp.float32))))
      tk, tr = _time(kern, args, iters), _time(ref, args, iters)
      valid_bytes = 2 * int(np.sum(np.asarray(kvl))) * kv_heads * head_dim * dt.itemsize
      gbps = valid_bytes / tk / 1e9
      row = dict(max_len=s, T=t, kernel_ms=tk * 1e3, ref_ms=tr * 1e3, ratio=tr / tk, valid_mb=valid_bytes / 1e6,
                 gbps=None if interpret else gbps, frac_peak=None if peak is None else gbps / peak, max_err=err)
      rows.append(row)
      gb = "-" if interpret else f"{gbps:8.1f}"
      pk = "-" if row["frac_peak"] is None else f"{100 * row['frac_peak']:5.1f}%"
      print(f"{s:>8} {t:>3} {tk * 1e3:>10.3f} {tr * 1e3:>9.3f} {tr / tk:>8.2f} {valid_bytes / 1e6:>9.2f} "
            f"{gb:>8} {pk:>6}   (max |err| {err:.1e})")
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--small", action="store_true", help="small shapes (use on CPU: interpret mode)")
  p.add_argument("--iters", type=int, default=None)
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--heads", type=int, default=None)
  p.add_argument("--kv-heads", type=int, default=None)
  p.add_argument("--head-dim", type=int, default=None)
  p.add_argument("--dtype", default=None)
  p.add_argument("--fill", type=float, default=0.5, help="max valid fraction of the cache per row")
  a = p.parse_args()
  small = a.small
  decode_attention_table(small=small, iters=a.iters or (3 if small else 20), batch=a.batch or (2 if small else 8),
                         heads=a.heads or (4 if small else 32), kv_heads=a.kv_heads or (2 if small else 8),
                         head_dim=a.head_dim or (32 if small else 128),
                         dtype=a.dtype or ("float32" if small else "bfloat16"), fill=a.fill)


if __name__ == "__main__":
  main()
