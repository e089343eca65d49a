"""Static TPU cost read from the TPU compiler on a CPU host: the XLA fusions' ``estimated_cycles`` of a compiled
module and the Mosaic (Pallas) kernels' VLIW bundle counts from libtpu's per-program dump.

A Mosaic kernel carries no ``estimated_cycles``; its cost is read from ``*-final_bundles.txt``, written only when
libtpu was loaded with ``--xla_jf_dump_to=DIR --xla_jf_dump_llo_pass_label_regex=final`` in ``LIBTPU_INIT_ARGS``
(:func:`dump_flags`). libtpu reads that variable once, when it loads, so a process that wants the dump must set it
before its first TPU compile (``benchmarks/tpu_kernel_cost.py`` and ``python -m ardiff compile`` use a fresh process).

A kernel's grid is one loop in the dump: per grid step a fixed overhead, plus a guarded compute body for the tile
the step visits (ardiff's block-sparse kernels: one body for unmasked, one for masked tiles; padded steps run
none), plus bodies guarded once per output row (init, finalize). The estimate is
``steps * overhead + rows * once_per_row + full_tiles * full_body + partial_tiles * partial_body`` in bundles
(~ issue cycles): a static proxy that ignores DMA waits and stalls, not a time.
"""

from __future__ import annotations

import glob
import os
import re

# ----------------------------------------------------------------------------------------------------------------
# The dump flag.


def dump_flags(directory: str, existing: str = "") -> str:
  """``LIBTPU_INIT_ARGS`` value that makes libtpu write each program's final bundles under ``directory``."""
  return f"{existing} --xla_jf_dump_to={directory} --xla_jf_dump_llo_pass_label_regex=final".strip()


# ----------------------------------------------------------------------------------------------------------------
# One program's bundle dump.

_ADDR = re.compile(r"^\s*(0x[0-9a-f]+|\d+)\s")
_BRANCH = re.compile(r"sbr\.rel \([^)]*\) target = \$region(\d+)")


def _lines(path):
  out = []
  with open(path) as fh:
    for line in fh:
      m = _ADDR.match(line)
      if m:
        out.append((int(m.group(1), 0), line))
  return out


def parse_bundles(path: str) -> dict:
  """Grid-loop anatomy of one kernel's ``*-final_bundles.txt``: loop body length, trip count (grid steps), compute
  bodies (guarded bodies holding a matmul, in program order) and the other guarded bodies, all in bundles.
  A program without a loop (no grid) has ``loop = None`` and ``total`` = its bundle count."""
  lines = _lines(path)
  total = len(lines)
  loop_start = next((i for i, (_, l) in enumerate(lines) if " LB:" in l[:16]), None)
  if loop_start is None:
    return {"loop": None, "trip": None, "compute": [], "other": [], "total": total}
  region = re.search(r"Start region (\d+)", lines[loop_start][1]).group(1)
  # The loop ends at its back branch (the last region markers close a few bundles earlier).
  loop_end = next(i for i in range(loop_start, len(lines)) if f"target = $region{region} " in lines[i][1] + " ")
  trip = None
  for _, l in lines[loop_start:loop_end + 1]:
    if "loop exit test" in l and trip is None:
      trip = int(re.search(r", (\d+) /\* loop exit test", l).group(1))
  bodies = []  # (start, end) line indices of every guarded body inside the loop
  for i in range(loop_start, loop_end + 1):
    m = _BRANCH.search(lines[i][1])
    if not m or m.group(1) == region:
      continue
    target = f"region {m.group(1)}"
    j = next((j for j in range(i + 1, loop_end + 1) if "PF:" in lines[j][1][:16] and target in lines[j][1]), None)
    if j is not None:
      bodies.append((i, j))
  has_mxu = lambda s, e: any("vmatmul" in lines[x][1] for x in range(s, e))
  size = lambda s, e: lines[e][0] - lines[s][0] - 1
  inside = lambda a, b: b[0] <= a[0] and a[1] <= b[1] and a != b
  mxu = [b for b in bodies if has_mxu(*b)]
  compute = [b for b in mxu if not any(inside(c, b) for c in mxu)]
  other = [b for b in bodies if not has_mxu(*b) and not any(inside(b, c) for c in bodies if c not in mxu)
           and not any(inside(b, c) for c in compute)]
  loop_len = lines[loop_end][0] - lines[loop_start][0] + 1
  return {"loop": loop_len, "trip": trip, "compute": [size(*b) for b in sorted(compute)],
          "other": [size(*b) for b in sorted(other)], "total": total}


def tile_bodies(anatomy: dict, two_kinds: bool) -> tuple:
  """(full, partial) compute-body bundles: ardiff's kernels (``two_kinds``) have an unmasked then a masked body;
  otherwise one body serves every visited tile."""
  bodies = anatomy["compute"]
  if two_kinds and len(bodies) == 2:
    return bodies[0], bodies[1]
  body = max(bodies) if bodies else 0
  return body, body


def fused_dq_bodies(anatomy: dict) -> bool:
  """Whether a dK/dV kernel's guarded non-matmul bodies are those of the fused dQ kernel: in program order init,
  dQ init, finalize, dQ finalize, the dQ ones (zeroing / writing the whole-sequence accumulator) the larger."""
  o = anatomy["other"]
  return len(o) == 4 and o[1] > o[0] and o[3] > o[2]


def loop_estimate(anatomy: dict, *, rows: int, full_tiles: int, partial_tiles: int, two_kinds: bool,
                  outer_rows: int | None = None) -> dict:
  """Bundles of one kernel call: per-step overhead x grid steps + once-per-row bodies x rows + the compute body of
  each visited tile (FULL / PARTIAL). ``outer_rows``: for a fused dK/dV+dQ kernel (:func:`fused_dq_bodies`), how
  many times its dQ init and finalize run (once per batch row and kv head, not per kv tile)."""
  full, partial = tile_bodies(anatomy, two_kinds)
  steps = anatomy["trip"] or 0
  once = sum(anatomy["other"])
  overhead = anatomy["loop"] - sum(anatomy["compute"]) - once
  per_row, per_outer = once, 0
  if outer_rows is not None and fused_dq_bodies(anatomy):
    per_outer = anatomy["other"][1] + anatomy["other"][3]
    per_row = once - per_outer
  est = steps * overhead + rows * per_row + (outer_rows or 0) * per_outer + full_tiles * full + \
      partial_tiles * partial
  return {"full": full, "partial": partial, "overhead": overhead, "once_per_row": per_row,
          "once_per_outer_row": per_outer, "steps": steps, "estimate": est}


def find_dump(directory: str, instruction: str):
  """The final-bundles file of one HLO instruction (its program is named after it), or None."""
  pattern = os.path.join(glob.escape(directory), f"*-{glob.escape(instruction)}-*final_bundles.txt")
  files = [p for p in glob.glob(pattern) if "schedule" not in os.path.basename(p)]
  return sorted(files)[0] if files else None


# ----------------------------------------------------------------------------------------------------------------
# A compiled module's text (``HloModule.to_string`` with large constants printed).

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_WHILE = re.compile(r" while\(.*condition=%([^,\s]+), body=%([^,\s]+)")
_CALL = re.compile(r" call\(.*to_apply=%([^,\s]+)")
_S32_CONSTANT = re.compile(r"= s32\[\]\S* constant\((\d+)\)")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_SHAPE = re.compile(r"^[a-z]+\d*\[([\d,]*)\]")


def _computations(hlo_text: str) -> dict:
  comps, name = {}, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      name = m.group(1)
      comps[name] = []
      if line.startswith("ENTRY"):
        comps["__entry__"] = comps[name]
    elif name is not None:
      comps[name].append(line)
  return comps


def walk(hlo_text: str, line_cost) -> dict:
  """``{key: total}`` of ``line_cost(line) -> {key: amount}`` over the entry computation and the computations it
  ``call``s, counting a ``while`` body (scanned layers, gradient accumulation) times its trip count: the largest
  s32 constant of its condition (a counted loop's bound)."""
  comps = _computations(hlo_text)

  def trip(cond: str) -> int:
    bounds = [int(c) for line in comps.get(cond, ()) for c in _S32_CONSTANT.findall(line)]
    return max(bounds, default=1)

  memo = {}

  def add(into: dict, part: dict, times: int = 1):
    for k, v in part.items():
      into[k] = into.get(k, 0) + times * v

  def total(comp: str) -> dict:
    if comp not in memo:
      memo[comp] = {}  # a cycle in the call graph (none expected) counts once
      cost = {}
      for line in comps.get(comp, ()):
        w, c = _WHILE.search(line), _CALL.search(line)
        if w:
          add(cost, total(w.group(2)), trip(w.group(1)))
        elif c:
          add(cost, total(c.group(1)))
        else:
          add(cost, line_cost(line))
      memo[comp] = cost
    return memo[comp]

  return total("__entry__")


def xla_estimated_cycles(hlo_text: str) -> int:
  """Sum of the TPU compiler's ``estimated_cycles`` over the XLA fusions (per chip), while bodies x trip count.
  Mosaic kernels carry no estimate and count 0 here (:func:`kernel_bundles` counts them)."""
  return walk(hlo_text, lambda line: {"cycles": sum(int(c) for c in _CYCLES.findall(line))}).get("cycles", 0)


def _balanced(text: str, start: int) -> str:
  """``text[start:]`` up to the parenthesis closing the one just before ``start``."""
  depth = 1
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return text[start:i]
  return text[start:]


def _instructions(hlo_text: str) -> dict:
  """``{name: (shape text, opcode, operand text, attributes text, computation)}`` of every instruction."""
  out = {}
  for comp, lines in _computations(hlo_text).items():
    if comp == "__entry__":  # an alias of the entry computation's own entry
      continue
    for line in lines:
      m = _INSTR.match(line)
      if m:
        args = _balanced(line, m.end(3) + 1)
        out[m.group(1)] = (m.group(2), m.group(3), args, line[m.end(3) + 2 + len(args):], comp)
  return out


def _operands(args: str) -> list:
  return re.findall(r"%([\w.\-]+)", re.sub(r"/\*.*?\*/", "", args))


def _constant(instrs: dict, name: str):
  """The int table a value is a constant of, as (shape, flat values), followed through copies, bitcasts and the
  tuples that carry it into a ``while`` body (loop-invariant operands of the scanned layers); None if it is not one."""
  loops = {}  # body computation -> the while instruction running it
  for _ in range(64):
    if name not in instrs:
      return None
    shape, op, args, attrs, comp = instrs[name]
    if op == "constant":
      dims = _SHAPE.match(shape)
      values = [int(v) for v in re.findall(r"-?\d+", args)]
      if dims is None or "..." in args:
        return None
      dims = tuple(int(d) for d in dims.group(1).split(",") if d)
      n = 1
      for d in dims:
        n *= d
      return (dims, values) if len(values) == n else None
    if op in ("copy-done", "copy-start", "copy", "bitcast"):
      name = _operands(args)[0]
      continue
    if op != "get-tuple-element":
      return None
    index = int(re.search(r"index=(\d+)", attrs).group(1))
    source = _operands(args)[0]
    s_op, s_comp = instrs.get(source, (None,) * 5)[1], instrs.get(source, (None,) * 5)[4]
    if s_op == "parameter":  # the loop-carried tuple of a while body: continue at the while's operand
      if not loops:
        for w_name, (_, w_op, w_args, w_attrs, _) in instrs.items():
          b = re.search(r"body=%([^,\s]+)", w_attrs) if w_op == "while" else None
          if b:
            loops[b.group(1)] = _operands(w_args)[0]
      if s_comp not in loops:
        return None
      source = loops[s_comp]
    if source not in instrs or instrs[source][1] != "tuple":
      return None
    ops = _operands(instrs[source][2])
    if index >= len(ops):
      return None
    name = ops[index]
  return None


def kernel_bundles(hlo_text: str, dump_dir: str) -> dict:
  """Bundle estimate of every Mosaic kernel call in a compiled module (per chip), while bodies x trip count.

  ``hlo_text`` must print large constants (``HloPrintOptions.print_large_constants``): ardiff's block-sparse
  kernels take their per-step tile kinds (PAD / MASKED / UNMASKED, ``kernels_pallas.block_sparse_metadata``) as a
  constant scalar-prefetch operand (operand 1), which gives the FULL and PARTIAL tiles each call visits. Another
  Mosaic kernel (no such table) is counted as every grid step running its whole loop body: an upper bound, marked
  ``exact=False``. Returns ``{"total": bundles per step, "kernels": {instruction: per-call figures and "calls" per
  step}, "missing": [names without a dump]}``."""
  from kernels_pallas.block_sparse_metadata import MASKED, UNMASKED

  instrs = _instructions(hlo_text)
  per_call, missing = {}, []
  for name, (_, op, args, attrs, _) in instrs.items():
    if op != "custom-call" or 'custom_call_target="tpu_custom_call"' not in attrs:
      continue
    path = find_dump(dump_dir, name)
    if path is None:
      missing.append(name)
      continue
    a = parse_bundles(path)
    if a["loop"] is None:
      per_call[name] = {"estimate": a["total"], "exact": True, "steps": 1}
      continue
    ops = _operands(args)
    table = _constant(instrs, ops[1]) if len(ops) > 1 and name.startswith("block_sparse_attention_") else None
    shapes = re.findall(r"[a-z]+\d*\[([\d,]*)\]", attrs.split("operand_layout_constraints={", 1)[-1])
    steps = a["trip"] or 1
    if table is not None and len(table[0]) == 2 and set(table[1]) <= {0, MASKED, UNMASKED} and len(shapes) > 5:
      (rows_k, width), kinds = table
      # batch x heads of this shard; the loop runs a couple of steps more than the grid (pipeline prologue/epilogue)
      calls_per_table = steps // (rows_k * width)
      groups = 1
      if "_dkv_" in name:  # grid (b, kv_heads, kv_tiles, groups, width): per-row bodies once per kv row
        q_heads, kv_heads = int(shapes[4].split(",")[1]), int(shapes[5].split(",")[1])
        groups = max(1, q_heads // kv_heads)
      # dK/dV rows are kv tiles; the fused dQ's init/finalize run once per (batch, kv head) = rows / kv tiles.
      fig = loop_estimate(a, rows=steps // width // groups,
                          outer_rows=calls_per_table // groups if "_dkv_" in name else None,
                          full_tiles=calls_per_table * kinds.count(UNMASKED),
                          partial_tiles=calls_per_table * kinds.count(MASKED), two_kinds=True)
      fig["exact"] = 0 <= steps - calls_per_table * rows_k * width <= 2
    else:
      fig = {"estimate": steps * a["loop"], "steps": steps, "exact": False}
    per_call[name] = fig
  calls = walk(hlo_text, lambda line: _kernel_call(line, per_call))
  for name, fig in per_call.items():
    fig["calls"] = calls.get(name, 0)  # executions per step (a kernel in the scanned layer body: once per layer)
  total = sum(fig["calls"] * fig["estimate"] for fig in per_call.values())
  return {"total": total, "kernels": per_call, "missing": missing}


def _kernel_call(line: str, names) -> dict:
  if "tpu_custom_call" not in line:
    return {}
  m = _INSTR.match(line)
  return {m.group(1): 1} if m and m.group(1) in names else {}
