"""AOT compiles of the sharded train step with the real TPU compiler (libtpu on CPU), and the fit check."""

import pytest

from ardiff.training import aot
from configs import bd3_1b_tpu
from configs import default as default_config


def test_default_experiment_compiles_and_fits_on_v5e_2x2():
  r = aot.compile_train_step(default_config.get_config(), "v5e:2x2")
  assert r["chips"] == 4 and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert r["fits"] and 0 < r["per_chip_gib"] < 1
  assert r["xla_cycles"] > 0  # the compiler's static estimate of the step's XLA fusions


def test_xla_estimate_counts_while_bodies_times_their_trip_count():
  hlo = """
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %f = f32[8]{0} fusion(%x), kind=kLoop, backend_config={"estimated_cycles":"100","x":"1"}
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %constant.1 = s32[]{:T(128)} constant(12)
  ROOT %lt = pred[] compare(%i, %constant.1), direction=LT
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %g = f32[8]{0} fusion(%x), kind=kLoop, backend_config={"estimated_cycles":"7"}
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
}
"""
  assert aot.xla_estimated_cycles(hlo) == 7 + 12 * 100


def test_one_billion_parameter_config_compiles_for_a_512_chip_pod():
  c = bd3_1b_tpu.get_config()
  r = aot.compile_train_step(c, "v5p:8x8x8")
  assert r["chips"] == 512 and r["mesh"] == {"data": 1, "fsdp": 128, "tensor": 4}
  assert 0.9e9 < r["params"] < 1.5e9
  assert r["fits"] and r["per_chip_gib"] < r["hbm_gib"]
  assert any("'auto' compiled with the TPU (Mosaic) kernels" in n for n in r["notes"])  # what the pod will run


def test_too_big_a_batch_does_not_fit_with_a_clear_message():
  c = default_config.get_config()
  c.train.batch_size = 4096
  c.data.seq_len = 2048
  with pytest.raises(aot.DoesNotFitError, match="per chip|ran out of memory"):
    aot.compile_train_step(c, "v5e:2x2")


def test_unknown_topology_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown TPU generation 'v99'"):
    aot.compile_train_step(default_config.get_config(), "v99:1x1")
  with pytest.raises(ValueError, match="is not a v5p slice"):  # libtpu lays this typo out; parse_topology refuses it
    aot.compile_train_step(default_config.get_config(), "v5p:8x8x88")


def test_sampler_steps_compile_with_a_sharded_kv_cache():
  out = aot.compile_sampler_steps(default_config.get_config(), "v5e:2x2")
  assert set(out) == {"ar_step", "denoise_step"} and all(0 < v < 1 for v in out.values())


def test_sampler_steps_compile_with_the_pallas_decode_kernel():
  c = default_config.get_config()
  c.model.attention_impl = "pallas"
  out = aot.compile_sampler_steps(c, "v5e:2x2")
  assert set(out) == {"ar_step", "denoise_step"}


# One small block-sparse kernel (BD3 over 2 x 256 tokens, 128 tiles: FULL, PARTIAL and padded grid steps; GQA 2/1),
# forward and backward, compiled for v5e in a fresh process: libtpu reads its dump flag only when it loads.
_KERNEL_DUMP_SCRIPT = """
import json, os, sys
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from ardiff import masks
from ardiff.training import aot, tpu_cost
from kernels_pallas.block_sparse_attention import block_sparse_attention
dev = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
sds = lambda h: jax.ShapeDtypeStruct((1, 512, h, 64), jnp.bfloat16, sharding=SingleDeviceSharding(dev))
loss = lambda q, k, v: jnp.sum(block_sparse_attention(q, k, v, mask=masks.BD3(256, 16), block_q=128, block_kv=128,
                                                      backend="tpu").astype(jnp.float32))
with jax.default_device(dev):
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(sds(2), sds(1), sds(1)).compile()
text = aot._module_text(compiled)
print(json.dumps({"kernels": tpu_cost.kernel_bundles(text, sys.argv[1]), "xla": aot.xla_estimated_cycles(text)}))
"""


def test_kernel_bundle_estimate_reads_the_tile_kinds_and_loop_of_a_real_mosaic_dump(tmp_path):
  import json
  import os
  import subprocess
  import sys

  import numpy as np

  from ardiff import masks
  from ardiff.training import tpu_cost
  from kernels_pallas.block_sparse_metadata import MASKED, UNMASKED, build_metadata

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, LIBTPU_INIT_ARGS=tpu_cost.dump_flags(str(tmp_path)), PYTHONPATH=root,
             ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  p = subprocess.run([sys.executable, "-c", _KERNEL_DUMP_SCRIPT, str(tmp_path)], env=env, cwd=root,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  k = r["kernels"]
  assert k["missing"] == [] and r["xla"] > 0
  meta = build_metadata(masks.BD3(256, 16), 512, 512, 128, 128)
  heads = 2  # batch 1 x 2 query heads; the dK/dV grid runs kv_heads (1) x groups (2) = the same
  # Per-row bodies (init, finalize) run once per output row: per (query head, q tile), resp. (kv head, kv tile).
  # outer: the fused dQ accumulator's init/finalize, once per (batch row, kv head) = 1 here; the forward has none
  expect = {"fwd": (meta.fwd_kind, heads * meta.num_q_tiles, 0), "dkv": (meta.dkv_kind, 1 * meta.num_kv_tiles, 1)}
  seen = set()
  for name, fig in k["kernels"].items():
    pass_ = name.split("_")[3]  # block_sparse_attention_{fwd,dkv}_tpu_...
    kinds, rows, outer = expect[pass_]
    seen.add(pass_)
    assert fig["exact"] and fig["calls"] == 1
    full, partial = heads * int(np.sum(kinds == UNMASKED)), heads * int(np.sum(kinds == MASKED))
    assert full > 0 and partial > 0 and fig["steps"] >= heads * kinds.size  # padded steps are grid steps too
    assert 0 < fig["full"] < fig["partial"]  # the masked body evaluates the mask on top of the unmasked one's work
    # The table read from the module's constants gives the metadata's FULL / PARTIAL tiles in the formula.
    assert fig["estimate"] == (fig["steps"] * fig["overhead"] + rows * fig["once_per_row"]
                               + outer * fig["once_per_outer_row"] + full * fig["full"]
                               + partial * fig["partial"]), fig
    assert (fig["once_per_outer_row"] > 0) == (pass_ == "dkv")
  assert seen == {"fwd", "dkv"}  # dQ is fused into the dK/dV kernel at this size
  assert k["total"] == sum(f["estimate"] for f in k["kernels"].values())


def test_compile_output_says_when_the_kernels_were_not_estimated(capsys):
  aot._print_estimate({"xla_cycles": 5_000_000, "kernels": None, "step_estimate": None})
  out = capsys.readouterr().out
  assert "XLA fusions 5.00 M cycles" in out and "NOT ESTIMATED" in out and "whole step: not estimated" in out
  aot._print_estimate({"xla_cycles": 5_000_000, "step_estimate": 7_000_000,
                       "kernels": {"total": 2_000_000, "missing": [], "kernels": {
                           "k.1": {"estimate": 500_000, "calls": 4, "exact": True}}}})
  out = capsys.readouterr().out
  assert "k.1: 0.500 M bundles x 4 calls" in out and "whole step: 7.00 M cycles" in out
  aot._print_estimate({"xla_cycles": 5_000_000, "step_estimate": 5_000_000,
                       "kernels": {"total": 0, "missing": [], "kernels": {}}})
  assert "Pallas kernels: none in this step" in capsys.readouterr().out
