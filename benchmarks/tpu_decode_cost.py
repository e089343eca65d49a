"""Static TPU cost of ardiff's decode attention against JAX's paged attention kernel, on a CPU host.

The method of ``benchmarks/tpu_kernel_cost.py`` (libtpu AOT compile with ``--xla_jf_dump_to``, count the scheduled
VLIW bundles of the per-tile loop body), for one new token per row (T = 1) against a KV cache of ``--lengths``:

* ardiff (``kernels_pallas.decode_attention``, cache ``[b, max_len, kv_heads, d]``): grid ``(batch, kv_tiles)``,
  one grid step computes one kv tile for every kv head; bundles per KV tile = the step's compute body / kv heads;
* reference: ``jax.experimental.pallas.ops.tpu.paged_attention`` (pages ``[kv_heads, pages, page_size, d]``, one
  kv head per program, an inner loop over compute blocks of ``--block`` rows); bundles per KV tile = that inner
  loop's body.

Both count a tile of ``--block`` cache rows of one kv head. Steps past a row's length: ardiff's K/V index map
clamps to the row's last tile (no DMA) and ``pl.when`` skips the compute (tests/test_decode_attention.py poisons
those tiles with NaN); paged attention stops its loop at the length. One compile per case in a fresh process.

    python benchmarks/tpu_decode_cost.py --gens v5e,v6e --lengths 1024,8192,32768
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpu_kernel_cost as cost  # noqa: E402  (the bundle-dump reader and topologies)


def loops(path: str):
  """Every loop of a ``*-final_bundles.txt``: (nesting depth, body length in bundles, holds MXU work)."""
  lines = cost._lines(path)
  out = []
  for i, (addr, line) in enumerate(lines):
    m = re.match(r"\s*\S+\s+LB:\s*(>+)", line)
    if not m:
      continue
    region = re.search(r"Start region (\d+)", line).group(1)
    end = next((k for k in range(i, len(lines)) if f"target = $region{region} " in lines[k][1] + " "), None)
    if end is not None:
      out.append((len(m.group(1)), lines[end][0] - addr + 1, any("vmatmul" in lines[x][1] for x in range(i, end))))
  return out


def run_case(dump: str, impl: str, gen: str, length: int, batch: int, heads: int, kv_heads: int, d: int,
             block: int) -> dict:
  """Compile one case with the bundle dump into the directory ``dump`` and read it back (a fresh process)."""
  os.environ["LIBTPU_INIT_ARGS"] = f"--xla_jf_dump_to={dump} --xla_jf_dump_llo_pass_label_regex=final"
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  sys.path.insert(0, cost.ROOT)
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  from jax.sharding import SingleDeviceSharding

  dev = topologies.get_topology_desc(topology_name=cost.TOPOLOGY[gen], platform="tpu").devices[0]
  sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(dev))
  if impl == "ardiff":
    from ardiff import masks
    from kernels_pallas.decode_attention import decode_attention
    f = lambda q, kc, vc, n: decode_attention(q, kc, vc, q_offsets=n - 1, kv_lengths=n, mask=masks.Causal(),
                                              backend="tpu", block_kv=block)
    args = (sds((batch, 1, heads, d)), sds((batch, length, kv_heads, d)), sds((batch, length, kv_heads, d)),
            sds((batch,), jnp.int32))
    name = "decode_attention"
  else:
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
    page = 128
    pages = batch * length // page
    f = lambda q, kp, vp, n, idx: paged_attention(q, kp, vp, n, idx, pages_per_compute_block=block // page)
    args = (sds((batch, heads, d)), sds((kv_heads, pages, page, d)), sds((kv_heads, pages, page, d)),
            sds((batch,), jnp.int32), sds((batch, length // page), jnp.int32))
    name = "paged_attention"
  try:
    with jax.default_device(dev):
      jax.jit(f).lower(*args).compile()
  except Exception as e:  # noqa: BLE001 - a failed compile is a result of the sweep
    return {"error": " ".join(str(e).split())[:300]}
  files = [p for p in glob.glob(os.path.join(dump, f"*{name}*-final_bundles.txt")) if "schedule" not in p]
  if not files:
    return {"error": f"no bundle dump for {name}"}
  if impl == "ardiff":
    a = cost.parse_bundles(sorted(files)[0])
    step = max(a["compute"])  # every kv head of one tile
    return {"per_tile": step / kv_heads, "step_body": step, "overhead": a["loop"] - step - sum(a["other"])}
  inner = [(depth, n) for depth, n, mxu in loops(sorted(files)[0]) if mxu and depth > 1]
  if not inner:
    return {"error": "no inner compute loop found in the paged attention dump"}
  return {"per_tile": min(inner, key=lambda x: -x[0])[1]}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--gens", default="v5e,v6e")
  ap.add_argument("--lengths", default="1024,8192,32768", help="cache lengths (max_len = each row's length)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--block", type=int, default=512, help="cache rows per KV tile (a multiple of 128)")
  ap.add_argument("--timeout", type=int, default=600)
  ap.add_argument("--case", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.case:
    dump = tempfile.mkdtemp(prefix="tpu_decode_cost_")
    try:
      print(json.dumps(run_case(dump, **json.loads(args.case))))
    finally:
      shutil.rmtree(dump, ignore_errors=True)
    return 0
  for g in args.gens.split(","):
    if g not in cost.TOPOLOGY:
      print(f"error: unknown TPU generation {g!r}; choose from {', '.join(cost.TOPOLOGY)}", file=sys.stderr)
      return 2
  if args.block % 128:
    print(f"error: --block {args.block} must be a multiple of 128 (the page size)", file=sys.stderr)
    return 2
  print(f"{'gen':4} {'length':>6} {'ardiff/tile':>11} {'paged/tile':>10} {'ratio':>6}   (bundles per KV tile of "
        f"{args.block} rows x 1 kv head; b={args.batch}, h={args.heads}, kv={args.kv_heads}, d={args.head_dim})")
  for gen in args.gens.split(","):
    for length in (int(x) for x in args.lengths.split(",")):
      got = {}
      for impl in ("ardiff", "paged"):
        case = dict(impl=impl, gen=gen, length=length, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                    d=args.head_dim, block=args.block)
        print(f"compiling {case}", file=sys.stderr, flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
        try:
          p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=cost.ROOT)
          line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("{")), None)
          got[impl] = json.loads(line) if line else {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
        except subprocess.TimeoutExpired:
          got[impl] = {"error": f"compile timed out after {args.timeout} s"}
      a, r = got["ardiff"], got["paged"]
      if "error" in a or "error" in r:
        print(f"{gen:4} {length:6} failed: {a.get('error') or r.get('error')}")
        continue
      print(f"{gen:4} {length:6} {a['per_tile']:11.0f} {r['per_tile']:10.0f} {a['per_tile'] / r['per_tile']:6.2f}",
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
