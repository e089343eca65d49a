"""Static TPU cost of ardiff's block-sparse attention kernels against splash attention, on a CPU host.

No TPU is needed: libtpu (``pip install "jax[tpu]==0.10.2"``) runs the real TPU compiler here, and
``--xla_jf_dump_to`` makes it dump each Mosaic kernel's final scheduled VLIW bundles (one bundle issues per cycle).
For every kernel (forward, dQ, dK/dV) this script reads the grid loop's body from that dump and splits it into

* the per-tile compute bodies: the top-level ``pl.when`` regions that hold MXU work (ardiff: one for tiles with
  no mask work (FULL), one for partially masked tiles (PARTIAL); splash: one for both),
* the other guarded regions (accumulator init, finalize): run once per output row,
* the rest: per grid step overhead (index maps, DMA issue/wait, pipeline bookkeeping),

and estimates ``cycles = steps * overhead + rows * once_per_row + sum_kind tiles_kind * body_kind`` with the tile
counts from the mask's block classes. The MXU floor is the matmul work alone (v5e/v5p: 4 MXUs of 128x128, v6e: 2 of
256x256 MACs per cycle). It ignores DMA and semaphore stalls: it ranks compute-side designs, not memory-bound ones.

Each case compiles in its own subprocess (the dump flag must be set before libtpu loads; ~5-20 s per case on a
shared 2-core CPU). Run ``python benchmarks/tpu_kernel_cost.py`` for the default table (v5e and v6e, causal and
BD3, T=4096, d=128, tiles 512); ``--gens v5e,v6e,v5p --masks all --tiles 128,256,512 --seq 2048,8192 --head-dim
64,128 --kv-heads 2`` widens the sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "v5p": "v5p:2x2x1", "v4": "v4:2x2x1"}
MACS_PER_CYCLE = {"v5e": 4 * 128 * 128, "v5p": 4 * 128 * 128, "v4": 4 * 128 * 128, "v6e": 2 * 256 * 256}
MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}  # matmuls of one tile per pass (dK/dV also recomputes the scores)
MASKS = ("causal", "block_causal", "bd3_4", "bd3_16", "tidar", "packed")


@dataclasses.dataclass(frozen=True)
class Case:
  impl: str      # "ardiff" | "splash"
  gen: str
  mask: str
  seq: int       # query length T (BD3/TiDAR: 2n = T)
  tile: int
  heads: int = 8
  kv_heads: int = 8
  head_dim: int = 128
  batch: int = 1


def _ardiff_mask(name: str, seq: int):
  from ardiff import masks
  if name in ("causal", "packed"):
    return masks.Causal()
  if name == "block_causal":
    return masks.BlockCausal(16)
  if name.startswith("bd3_"):
    return masks.BD3(seq // 2, int(name.split("_")[1]))
  if name == "tidar":
    return masks.TiDARTrain(seq // 2, 16)
  raise ValueError(f"unknown mask {name!r}; choose from {MASKS}")


def _segments(case: Case):
  """Packed sequences: four documents of equal length per row (1-based ids)."""
  import numpy as np
  return np.repeat(np.arange(1, 5, dtype=np.int32), case.seq // 4)[None].repeat(case.batch, 0)


def _tile_counts(case: Case) -> dict:
  """Visited tiles per kind over the whole call (all batch rows and query heads)."""
  import numpy as np
  from ardiff import masks
  classes = _ardiff_mask(case.mask, case.seq).block_classes(case.seq, case.seq, block_q=case.tile,
                                                              block_kv=case.tile)
  if case.mask == "packed":  # tiles across two documents are empty, inside one document's diagonal partial
    seg = _segments(case)[0][::case.tile]
    same = seg[:, None] == seg[None, :]
    classes = np.where(same, classes, masks.EMPTY)
  mult = case.batch * case.heads
  return {"full": int((classes == masks.FULL).sum()) * mult, "partial": int((classes == masks.PARTIAL).sum()) * mult,
          "q_tiles": classes.shape[0], "kv_tiles": classes.shape[1]}


def _build(case: Case, dev):
  """(function of q, k, v, kernels' name prefixes per pass) for one case; q [b, T, h, d]."""
  import jax
  import jax.numpy as jnp
  seg = _segments(case) if case.mask == "packed" else None
  if case.impl == "ardiff":
    from kernels_pallas.block_sparse_attention import block_sparse_attention
    mask = _ardiff_mask(case.mask, case.seq)

    def f(q, k, v):
      kw = {} if seg is None else {"q_segment_ids": jnp.asarray(seg), "kv_segment_ids": jnp.asarray(seg)}
      return block_sparse_attention(q, k, v, mask=mask, block_q=case.tile, block_kv=case.tile, backend="tpu", **kw)
    names = {"fwd": "block_sparse_attention_fwd", "dq": "block_sparse_attention_dq",
             "dkv": "block_sparse_attention_dkv"}
    return f, names
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  t = case.tile
  if case.mask in ("causal", "packed"):
    head_mask = sm.CausalMask((case.seq, case.seq))
  else:  # splash's own way for any other mask: a deduplicated table of the partial tiles
    head_mask = sm.NumpyMask(_ardiff_mask(case.mask, case.seq).dense(case.seq, case.seq))
  sizes = sk.BlockSizes(block_q=t, block_kv=t, block_kv_compute=t, block_q_dkv=t, block_kv_dkv=t,
                        block_kv_dkv_compute=t, block_q_dq=t, block_kv_dq=t)
  kernel = sk.make_splash_mha(sm.MultiHeadMask([head_mask] * case.heads), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1)

  def f(q, k, v):
    scale = case.head_dim ** -0.5
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q * scale, k, v))  # splash is head-major [h, T, d] per example
    if seg is None:
      o = jax.vmap(kernel)(qh, kh, vh)
    else:
      ids = sk.SegmentIds(q=jnp.asarray(seg), kv=jnp.asarray(seg))
      o = jax.vmap(kernel)(qh, kh, vh, segment_ids=ids)
    return jnp.swapaxes(o, 1, 2)
  return f, {"fwd": "splash_mha_fwd", "dq": "splash_mha_dq", "dkv": "splash_mha_dkv"}


# ------------------------------------------------------------------------------------------------------------------
# Reading the bundle dump.

# The dump reader is shared with ``python -m ardiff compile`` (its whole-step kernel estimate).
sys.path.insert(0, ROOT)
from ardiff.training.tpu_cost import _lines, dump_flags, loop_estimate, parse_bundles  # noqa: E402,F401
# TensorCores per chip (megacore v4/v5p: the parallel grid dimensions run split over two cores, each running half
# the grid steps, the dumped loop's trip count, and half the tiles; the estimate is one core's share = the chip's).
from kernels_pallas.tile_table import CORES  # noqa: E402


def _vmem_bytes(dump: str, kernel: str):
  """Scoped VMEM the kernel allocates, from its pre-finalize allocation report (None if absent)."""
  for path in glob.glob(os.path.join(dump, f"*{kernel}*-pre-finalize-registers-and-allocations.txt")):
    with open(path) as fh:
      m = re.search(r"[Ss]coped[^\n]*?(\d+)\s*bytes", fh.read())
    if m:
      return int(m.group(1))
  return None


def run_case(case: Case, dump: str) -> dict:
  """Compile one case (fwd + bwd) with the bundle dump (into the directory ``dump``) on and read it back; runs in a
  fresh process."""
  os.environ["LIBTPU_INIT_ARGS"] = dump_flags(dump)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  from jax.sharding import SingleDeviceSharding

  dev = topologies.get_topology_desc(topology_name=TOPOLOGY[case.gen], platform="tpu").devices[0]
  f, names = _build(case, dev)
  sds = lambda h: jax.ShapeDtypeStruct((case.batch, case.seq, h, case.head_dim), jnp.bfloat16,
                                       sharding=SingleDeviceSharding(dev))
  loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32))
  try:
    with jax.default_device(dev):  # Mosaic lowering asks the default device which TPU generation it targets
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(sds(case.heads), sds(case.kv_heads),
                                                       sds(case.kv_heads)).compile()
  except Exception as e:  # noqa: BLE001 - a VMEM OOM is a result of the sweep, not a crash
    return {"error": " ".join(str(e).split())[:300]}
  counts = _tile_counts(case)
  kv_rows = case.batch * case.kv_heads * counts["kv_tiles"]
  rows = {"fwd": case.batch * case.heads * counts["q_tiles"], "dq": case.batch * case.heads * counts["q_tiles"],
          "dkv": kv_rows}
  out = {"case": dataclasses.asdict(case), "tiles": counts, "passes": {}}
  dumped = lambda prefix: [p for p in glob.glob(os.path.join(dump, f"*{prefix}*-final_bundles.txt"))
                           if "schedule" not in p]
  # ardiff's dK/dV kernel computes dQ too when its whole-sequence accumulator fits VMEM: then no dQ kernel exists
  # and the dK/dV tile holds a fifth matmul.
  fused = case.impl == "ardiff" and not dumped(names["dq"])
  for pass_, prefix in names.items():
    if fused and pass_ == "dq":
      continue
    files = dumped(prefix)
    if not files:
      out["passes"][pass_] = {"error": f"no bundle dump for {prefix}"}
      continue
    a = parse_bundles(sorted(files)[0])
    # ardiff: an unmasked then a masked compute body; splash (or a mask-free compile): one body for every tile
    cores = CORES[case.gen]
    # The fused dQ's init and finalize run once per (batch row, kv head), not per kv tile.
    fig = loop_estimate(a, rows=rows[pass_] // cores, full_tiles=counts["full"] // cores,
                        partial_tiles=counts["partial"] // cores,
                        outer_rows=(case.batch * case.kv_heads // cores
                                    if pass_ == "dkv" and case.impl == "ardiff" else None),
                        two_kinds=case.impl == "ardiff")
    full, partial, steps, overhead, est = fig["full"], fig["partial"], fig["steps"], fig["overhead"], fig["estimate"]
    macs = case.tile * case.tile * case.head_dim * (MATMULS[pass_] + (1 if fused and pass_ == "dkv" else 0))
    floor_tile = macs // MACS_PER_CYCLE[case.gen]
    key = pass_ + ("+dq" if fused and pass_ == "dkv" else "")
    out["passes"][key] = {"full": full, "partial": partial, "overhead": overhead, "once_per_row": fig["once_per_row"],
                            "once_per_outer_row": fig["once_per_outer_row"],
                            "steps": steps, "estimate": est,
                            "floor": floor_tile * (counts["full"] + counts["partial"]) // cores,
                            "floor_tile": floor_tile,
                            "vmem": _vmem_bytes(dump, prefix)}
  return out


# ------------------------------------------------------------------------------------------------------------------
# Driver.


def _spawn(case: Case, timeout: int) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(dataclasses.asdict(case))]
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {"error": f"compile timed out after {timeout} s"}
  for line in reversed(p.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:300]}


def _table(results) -> None:
  hdr = (f"{'gen':4} {'mask':12} {'T':>5} {'d':>3} {'h/kv':>5} {'tile':>4} {'impl':6} {'pass':6} {'full':>6} "
         f"{'part':>6} {'ovh':>5} {'tiles F/P':>13} {'steps':>6} {'est Mcyc':>8} {'floor':>6} {'ardiff/splash':>13}")
  print(hdr)
  print("-" * len(hdr))
  by_key = {}
  for case, r in results:
    by_key[(case.gen, case.mask, case.seq, case.head_dim, case.kv_heads, case.tile, case.impl)] = r
  for case, r in results:
    key = (case.gen, case.mask, case.seq, case.head_dim, case.kv_heads, case.tile)
    head = f"{case.gen:4} {case.mask:12} {case.seq:5} {case.head_dim:3} {case.heads:2}/{case.kv_heads:<2} {case.tile:4}"
    if "error" in r:
      print(f"{head} {case.impl:6} compile failed: {r['error'][:120]}")
      continue
    other = by_key.get(key + ("splash" if case.impl == "ardiff" else "ardiff",), {})
    total = 0
    for pass_, p in r["passes"].items():
      if "error" in p:
        print(f"{head} {case.impl:6} {pass_:6} {p['error']}")
        continue
      total += p["estimate"]
      ratio = ""
      if case.impl == "ardiff" and "passes" in other and "estimate" in other["passes"].get(pass_, {}):
        ratio = f"{p['estimate'] / other['passes'][pass_]['estimate']:.2f}"
      elif case.impl == "ardiff" and pass_ == "dkv+dq" and "passes" in other:  # against splash's dQ + dK/dV
        theirs = [other["passes"].get(x, {}).get("estimate") for x in ("dq", "dkv")]
        ratio = f"{p['estimate'] / sum(theirs):.2f}" if all(theirs) else ""
      t = r["tiles"]
      print(f"{head} {case.impl:6} {pass_:6} {p['full']:6} {p['partial']:6} {p['overhead']:5} "
            f"{t['full']:6}/{t['partial']:<6} {p['steps']:6} {p['estimate'] / 1e6:8.2f} {p['floor_tile']:6} "
            f"{ratio:>13}")
    ratio = ""
    if case.impl == "ardiff" and "passes" in other:
      ot = sum(p.get("estimate", 0) for p in other["passes"].values())
      ratio = f"{total / ot:.2f}" if ot else ""
    print(f"{head} {case.impl:6} SUM    {'':>54} {total / 1e6:8.2f} {'':6} {ratio:>13}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--gens", default="v5e,v6e", help="TPU generations (v5e, v6e, v5p, v4)")
  ap.add_argument("--masks", default="causal,bd3_16", help=f"comma list from {MASKS} or 'all'")
  ap.add_argument("--seq", default="4096", help="sequence lengths T (BD3/TiDAR: 2n = T)")
  ap.add_argument("--tiles", default="512", help="square tile sizes (multiples of 128 dividing T)")
  ap.add_argument("--head-dim", default="128")
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv-heads", default="8", help="kv head counts (GQA when < --heads)")
  ap.add_argument("--impls", default="ardiff,splash")
  ap.add_argument("--timeout", type=int, default=600, help="seconds per compile")
  ap.add_argument("--json", help="also write the raw results here")
  ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, in a fresh process
  args = ap.parse_args(argv)
  if args.case:
    dump = tempfile.mkdtemp(prefix="tpu_cost_")
    try:
      print(json.dumps(run_case(Case(**json.loads(args.case)), dump)))
    finally:  # tens of MB of compiler dumps per case
      shutil.rmtree(dump, ignore_errors=True)
    return 0
  ints = lambda s: [int(x) for x in s.split(",")]
  masks = MASKS if args.masks == "all" else tuple(args.masks.split(","))
  for m in masks:
    if m not in MASKS:
      print(f"error: unknown mask {m!r}; choose from {', '.join(MASKS)} or 'all'", file=sys.stderr)
      return 2
  for g in args.gens.split(","):
    if g not in TOPOLOGY:
      print(f"error: unknown TPU generation {g!r}; choose from {', '.join(TOPOLOGY)}", file=sys.stderr)
      return 2
  cases = [Case(impl, g, m, t, tile, args.heads, kvh, d)
           for g in args.gens.split(",") for m in masks for t in ints(args.seq) for d in ints(args.head_dim)
           for kvh in ints(args.kv_heads) for tile in ints(args.tiles) for impl in args.impls.split(",")
           if tile <= t and t % tile == 0]
  results = []
  for c in cases:
    print(f"compiling {c}", file=sys.stderr, flush=True)
    results.append((c, _spawn(c, args.timeout)))
    if args.json:  # after every case: a long sweep that is stopped keeps what it measured
      with open(args.json, "w") as fh:
        json.dump([{"case": dataclasses.asdict(c), "result": r} for c, r in results], fh, indent=1)
  _table(results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
