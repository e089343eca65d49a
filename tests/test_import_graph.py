"""The package layering: kernels below the model, never the other way round, and no import cycles.

Every ``import`` of every module under ``ardiff/`` and ``kernels_pallas/`` is read with ``ast`` (including imports
inside functions, which hide cycles rather than remove them).
"""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ardiff", "kernels_pallas")
SUBPACKAGES = ("ardiff.sampling", "ardiff.training", "ardiff.export", "ardiff.objectives", "ardiff.data",
               "ardiff.checkpoints")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The project modules ``name`` imports anywhere in its body (``from pkg import mod`` resolves to ``pkg.mod``)."""
  is_pkg = path.name == "__init__.py"
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against this module's package
        base = name.split(".")
        base = base[:len(base) - node.level + (1 if is_pkg else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module
      for alias in node.names:
        full = f"{target}.{alias.name}"
        out.add(full if full in known else target)
  return {m for m in out if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
  mods = _modules()
  return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _group(module: str) -> str:
  """The node a module belongs to: kernels_pallas, one of SUBPACKAGES, or a top-level ardiff module."""
  if module.split(".")[0] == "kernels_pallas":
    return "kernels_pallas"
  for sub in SUBPACKAGES:
    if module == sub or module.startswith(sub + "."):
      return sub
  return ".".join(module.split(".")[:2])


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def test_the_graph_sees_imports_inside_functions(tmp_path):
  graph = _graph()
  assert "kernels_pallas.decode_attention" in graph["ardiff.attention"]
  assert "ardiff.masks" in graph["kernels_pallas.common"]
  probe = tmp_path / "probe.py"  # a lazy import inside a function, and a relative one
  probe.write_text("def f():\n  from ardiff import masks\n  from . import model\n")
  assert _imports("ardiff.probe", probe, {"ardiff.masks", "ardiff.model"}) == {"ardiff.masks", "ardiff.model"}


def test_kernels_import_nothing_from_ardiff_but_masks():
  bad = {(m, dep) for m, deps in _graph().items() if m.startswith("kernels_pallas")
         for dep in deps if dep.split(".")[0] == "ardiff" and dep != "ardiff.masks"}
  assert not bad, f"kernels_pallas must depend on jax and ardiff.masks only; found {sorted(bad)}"


def test_masks_is_a_leaf():
  assert _graph()["ardiff.masks"] == set()


def _package_edges() -> dict[str, set[str]]:
  edges: dict[str, set[str]] = {}
  for module, deps in _graph().items():
    src = _group(module)
    edges.setdefault(src, set()).update(_group(d) for d in deps if _group(d) != src)
  return edges


def test_no_cycles_between_packages():
  edges = _package_edges()
  assert not _cycles(edges), f"import cycles between packages: {_cycles(edges)}"


def test_on_disk_formats_sit_below_their_users():
  """ardiff.checkpoints (run dirs, params dirs, orbax steps, tree I/O) is read by training, sampling, eval and
  export, so it may import none of them."""
  upper = ("ardiff.training", "ardiff.sampling", "ardiff.export", "ardiff.cli")
  assert _package_edges()["ardiff.checkpoints"].isdisjoint(upper), _package_edges()["ardiff.checkpoints"]
  users = {g for g, deps in _package_edges().items() if "ardiff.checkpoints" in deps}
  assert {"ardiff.training", "ardiff.sampling", "ardiff.export"} <= users


def test_cycle_check_finds_a_cycle():
  edges = _package_edges()
  edges["kernels_pallas"].add("ardiff.model")  # a kernel importing the model would close model -> kernels
  assert any({"kernels_pallas", "ardiff.model"} <= set(c) for c in _cycles(edges))


def test_kernels_import_without_ardiff_attention():
  """The kernels (and their reference) import and run with ardiff.attention made unimportable."""
  code = textwrap.dedent("""
      import sys
      sys.modules["ardiff.attention"] = None  # any import of it now raises ImportError
      import jax.numpy as jnp
      from ardiff import masks
      from kernels_pallas import block_sparse_attention, block_sparse_metadata, common, decode_attention, reference
      q = jnp.ones((1, 16, 2, 16))
      out = block_sparse_attention.block_sparse_attention(q, q, q, mask=masks.Causal(), backend="gpu",
                                                          interpret=True)
      ref = reference.reference_attention(q, q, q, mask=masks.Causal())
      assert float(jnp.max(jnp.abs(out - ref))) < 1e-5
      assert "ardiff.attention" not in {m for m, v in sys.modules.items() if v is not None}
      print("ok")
  """)
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
