"""TPU tile choice of the block-sparse kernels (kernels_pallas/tile_table.py): the measured per-generation table,
the selection rule, the generation detection and the model's dispatch passing the compile target's generation.
No TPU needed; the AOT test uses libtpu's topology description (skipped without libtpu)."""

from __future__ import annotations

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import attention
from ardiff import masks
from kernels_pallas import tile_table
from kernels_pallas.block_sparse_attention import _check_block, block_sparse_attention

# benchmarks/tpu_kernel_cost.py --masks bd3_16 --seq 4096 --tiles 128,256,512,1024 --head-dim 64,128 --impls ardiff
# (8 heads, batch 1, bf16; JAX/libtpu 0.10.2): the printed forward + dK/dV/dQ estimate, bundles per chip (v5p: one
# of its two cores' share).
BENCHMARK_SUMS = {
    ("v5e", 64): {128: 2192230, 256: 1165670, 512: 815814, 1024: 1003318},
    ("v5e", 128): {128: 2221750, 256: 1148406, 512: 803574, 1024: 982486},
    ("v5p", 64): {128: 2123258, 256: 850238, 512: 477726, 1024: 513230},
    ("v5p", 128): {128: 1907740, 256: 769312, 512: 452928, 1024: 509912},
    ("v6e", 64): {128: 2072326, 256: 1103366, 512: 572870, 1024: 653030},
    ("v6e", 128): {128: 2065846, 256: 1102966, 512: 576630, 1024: 668534},
}


@pytest.mark.parametrize("key", sorted(BENCHMARK_SUMS))
def test_table_reproduces_the_benchmark_estimate(key):
  """The table's per-tile figures and the mask's tile counts give back what the benchmark printed for the call it
  measured (the benchmark's loop runs two pipeline steps more than the grid: 2 x overhead per pass)."""
  gen, d = key
  for tile, total in BENCHMARK_SUMS[key].items():
    got = 8 * tile_table.estimate(masks.BD3(2048, 16), 4096, 4096, d, gen, tile)
    assert abs(got - total) <= 2 * 8 * 2 * 80, (key, tile, got, total)


def test_every_generation_and_head_dim_is_measured_at_every_tile():
  for gen in ("v5e", "v6e", "v5p"):
    for d in (64, 128):
      assert sorted(tile_table.MEASURED[gen, d]) == [128, 256, 512, 1024], (gen, d)


@pytest.mark.parametrize("gen", ["v5e", "v6e", "v5p"])
@pytest.mark.parametrize("d", [64, 128])
def test_choice_is_the_cheapest_measured_tile(gen, d):
  """On the measured BD3 call the choice is the tile whose measured estimate is least (512 everywhere: 1024
  tiles visit 4x the area of a 512 tile on the diagonal band), and the rule's ranking is the benchmark's."""
  mask = masks.BD3(2048, 16)
  costs = {t: tile_table.estimate(mask, 4096, 4096, d, gen, t) for t in (128, 256, 512, 1024)}
  assert tile_table.tpu_tiles(mask, 4096, 4096, d, generation=gen) == (512, 512)
  assert min(costs, key=costs.get) == 512
  sums = BENCHMARK_SUMS[gen, d]
  assert sorted(costs, key=costs.get) == sorted(sums, key=sums.get)


def test_choice_depends_on_generation_and_length():
  """Per-element costs differ by generation: v6e's 1024 tile is cheaper per element than its 512 tile (v5e's is
  not), so a long causal call gets 1024 on v6e and 512 on v5e; a short one is a single tile."""
  causal = masks.Causal()
  assert tile_table.tpu_tiles(causal, 4096, 4096, 128, generation="v6e") == (1024, 1024)
  assert tile_table.tpu_tiles(causal, 4096, 4096, 128, generation="v5e") == (512, 512)
  assert tile_table.tpu_tiles(causal, 300, 300, 64, generation="v5e") == (304, 304)
  assert tile_table.tpu_tiles(causal, 8, 8, 64, generation="v6e") == (8, 8)


def test_head_dims_between_and_above_the_measured_ones():
  mask = masks.Causal()
  assert tile_table._key("v5e", 32) == ("v5e", 64) and tile_table._key("v5e", 96) == ("v5e", 128)
  assert tile_table._key("v5e", 256) is None
  assert tile_table.tpu_tiles(mask, 4096, 4096, 256, generation="v6e") == (tile_table.tpu_default_block(4096),) * 2


def test_unknown_generation_uses_the_length_rule():
  assert tile_table.detect_generation() is None  # a CPU host, no TPU mesh in scope
  for n in (100, 1000, 4096):
    assert tile_table.tpu_tiles(masks.Causal(), n, n, 64) == (tile_table.tpu_default_block(n),) * 2
  with pytest.raises(ValueError, match="generation='v7x' is not a TPU generation"):
    tile_table.tpu_tiles(masks.Causal(), 128, 128, 64, generation="v7x")


def test_length_rule_keeps_its_choices():
  assert [tile_table.tpu_default_block(n) for n in (5, 64, 128, 256, 1024, 4096, 4100)] == [8, 64, 128, 256, 512,
                                                                                             512, 512]


@pytest.mark.parametrize("gen", ["v5e", "v6e", "v5p"])
def test_every_choice_passes_the_tpu_tiling_check(gen):
  for n in list(range(1, 3000, 97)) + [4096, 8192]:
    for mask in (masks.Causal(), masks.BlockCausal(16)):
      bq, bk = tile_table.tpu_tiles(mask, n, n, 64, generation=gen)
      for block in (bq, bk):  # Mosaic: a multiple of 128, or a multiple of 8 covering the whole length
        assert block > 0 and (block % 128 == 0 or (block >= n and block % 8 == 0)), (gen, mask, n, block)
      _check_block("tpu", "block_q", bq, n)  # and the kernel's own validation accepts them (it raises otherwise)
      _check_block("tpu", "block_kv", bk, n)


def test_device_kinds():
  assert [tile_table.generation_of(k) for k in ("TPU v5 lite", "TPU v6 lite", "TPU v5", "TPU v4", "cpu")] == [
      "v5e", "v6e", "v5p", "v4", None]


def _kernel_names(jaxpr) -> str:
  return " ".join(sorted({str(e.params.get("name", "")) for e in _eqns(jaxpr) if e.primitive.name == "pallas_call"}))


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def test_dispatch_passes_the_target_generation():
  """``attention.target_backend("tpu", generation=...)`` reaches the kernel: a causal 4096 call is traced with
  1024 tiles for v6e and 512 for v5e (the table's choices above)."""
  q = jax.ShapeDtypeStruct((1, 4096, 2, 128), jnp.bfloat16)
  for gen, tile in (("v6e", 1024), ("v5e", 512)):
    call = lambda q, k, v: attention.pallas_attention(q, k, v, mask=masks.Causal())  # a fresh trace per target
    with attention.target_backend("tpu", generation=gen):
      names = _kernel_names(jax.make_jaxpr(call)(q, q, q).jaxpr)
    assert f"block_sparse_attention_fwd_tpu_bq{tile}_bk{tile}" in names, (gen, names)
  with pytest.raises(ValueError, match="generation must be one of"):
    with attention.target_backend("tpu", generation="v9"):
      pass


def test_explicit_tiles_and_generation_argument():
  q = jnp.zeros((1, 4096, 1, 64), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda q: block_sparse_attention(q, q, q, mask=masks.Causal(), backend="tpu",
                                                          generation="v6e", block_q=256))(q)
  assert "bq256_bk1024" in _kernel_names(jaxpr.jaxpr)


def test_aot_compile_target_generation_is_detected_from_the_mesh():
  """An AOT compile for a TPU slice from this CPU host traces under the slice's mesh: the kernels get that
  generation's tiles without being told (v6e: causal 4096 at d = 128 → 1024; v5e → 512)."""
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  for name, tile in (("v6e:2x2", 1024), ("v5e:2x2", 512)):
    try:
      topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as e:  # noqa: BLE001 - no libtpu on this host
      pytest.skip(f"TPU topology {name} unavailable (libtpu not installed?): {e}")
    mesh = Mesh(np.array(topo.devices).reshape(-1), ("batch",))
    spec = jax.ShapeDtypeStruct((4, 4096, 2, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P("batch")))
    with jax.set_mesh(mesh), attention.target_backend("tpu"):
      assert tile_table.detect_generation() == name.split(":")[0]
      text = jax.jit(lambda q: attention.pallas_attention(q, q, q, mask=masks.Causal())).trace(spec).lower(
          lowering_platforms=("tpu",)).as_text()
    assert f"block_sparse_attention_fwd_tpu_bq{tile}_bk{tile}" in text, name
