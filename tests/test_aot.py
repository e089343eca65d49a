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
