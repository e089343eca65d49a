"""Architectures beyond plain Llama/Qwen2: Qwen3 (q/k norms), RoPE scaling (llama3, linear, dynamic, yarn) at
lengths past the original context, attention/MLP biases. Each imports with logits equal to ``transformers``' (f32,
1e-4) and exports to a directory that ``transformers`` loads with the same logits; a wrong RoPE variant is caught
(negative control)."""

import numpy as np
import pytest

import jax

from ardiff import masks
from ardiff.config import ModelConfig
from ardiff.export import hf as hf_lib
from ardiff.model import Transformer
from tests.hf_testing import hf_logits, load_hf, random_hf_model

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
CASES = {
    # Qwen3-0.6B-like: q/k norms, GQA, head_dim != hidden/heads, plus attention_bias (q/k/v and o_proj)
    "qwen3": ("qwen3", dict(head_dim=32, attention_bias=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Llama-3.2-1B-like: llama3 RoPE, tied embeddings; the test sequence (40) runs past the original 8 positions
    "llama3_rope": ("llama", dict(tie_word_embeddings=True, rope_parameters=dict(LLAMA3))),
    # linear RoPE on a Llama with attention_bias and mlp_bias
    "linear_rope_biases": ("llama", dict(attention_bias=True, mlp_bias=True, rope_parameters={
        "rope_type": "linear", "rope_theta": 1e4, "factor": 4.0})),
    # dynamic NTK only changes anything past max_position_embeddings (32 here, the sequence is 40)
    "dynamic_rope": ("llama", dict(max_position_embeddings=32,
                                   rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})),
    "yarn_rope": ("qwen2", dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16})),
}
TOKENS = np.random.default_rng(1).integers(0, 97, size=(1, 40)).astype(np.int32)


def _logits(cfg, params, tokens=TOKENS):
  return np.asarray(jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t, mask=masks.Causal()).logits)(
      params, tokens))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  out = {}
  for name, (arch, config) in CASES.items():
    d = str(tmp_path_factory.mktemp(name))
    model = random_hf_model(arch, **config)
    model.save_pretrained(d, safe_serialization=True)
    out[name] = (d, model)
  return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_and_export_match_transformers(hf_dirs, tmp_path, name):
  d, model = hf_dirs[name]
  cfg, params = hf_lib.import_hf(d)
  want = hf_logits(model, TOKENS)
  got = _logits(cfg, params)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  out = hf_lib.export_hf(params, cfg, str(tmp_path / "export"))
  reloaded = load_hf(out)
  assert type(reloaded).__name__ == type(model).__name__
  np.testing.assert_allclose(hf_logits(reloaded, TOKENS), want, atol=1e-4, rtol=0)
  cfg2, _ = hf_lib.import_hf(out)
  assert cfg2.replace(init_std=cfg.init_std) == cfg  # the export records every field the import reads


def test_features_are_read(hf_dirs):
  cfgs = {name: hf_lib.import_hf(hf_dirs[name][0])[0] for name in ("qwen3", "linear_rope_biases", "llama3_rope")}
  assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].qkv_bias and cfgs["qwen3"].o_bias and cfgs["qwen3"].head_dim == 32
  biases = cfgs["linear_rope_biases"]
  assert biases.o_bias and biases.mlp_bias and not biases.qk_norm and biases.rope_scaling_dict["factor"] == 4.0
  assert cfgs["llama3_rope"].tie_embeddings
  assert cfgs["llama3_rope"].rope_scaling_dict == {k: v for k, v in LLAMA3.items() if k != "rope_theta"}


@pytest.mark.parametrize("name,wrong", [
    ("llama3_rope", None),  # scaling dropped: plain RoPE
    ("yarn_rope", {"rope_type": "linear", "factor": 4.0}),  # yarn read as linear (no ramp, no attention factor)
])
def test_wrong_rope_variant_is_detected(hf_dirs, name, wrong):
  """Negative control: the parity check above would catch a RoPE variant computed the wrong way."""
  d, model = hf_dirs[name]
  cfg, params = hf_lib.import_hf(d)
  if wrong is not None:
    wrong = {k: v for k, v in wrong.items() if k != "rope_theta"}
  bad = _logits(cfg.replace(rope_scaling=wrong), params)
  assert np.abs(bad - hf_logits(model, TOKENS)).max() > 1e-3


def test_rope_within_original_context_is_plain():
  """llama3/yarn leave short wavelengths alone, dynamic changes nothing inside max_position_embeddings: sanity of
  the formulas independent of transformers."""
  from ardiff import rope
  llama32 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}  # Llama-3.2-1B's config.json
  inv, _ = rope.inverse_frequencies(64, 500000.0, llama32)
  plain, _ = rope.inverse_frequencies(64, 500000.0)
  np.testing.assert_allclose(inv[:8], plain[:8], rtol=1e-6)  # wavelengths < 8192/4 untouched
  np.testing.assert_allclose(inv[-1], plain[-1] / 32, rtol=1e-6)  # wavelengths > 8192 divided by the factor
  yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
  assert rope.inverse_frequencies(64, 1e4, yarn)[1] == pytest.approx(0.1 * np.log(4.0) + 1)
  dyn = {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 32}
  inside, _ = rope.inverse_frequencies(64, 1e4, dyn, jax.numpy.arange(32)[None])
  np.testing.assert_allclose(inside, rope.inverse_frequencies(64, 1e4)[0], rtol=1e-6)


@pytest.mark.parametrize("changes,match", [
    (dict(qk_norm=True, qkv_bias=True), "Qwen3, whose attention_bias covers"),
    (dict(o_bias=True), "o_bias without qkv_bias"),
    (dict(qkv_bias=True, mlp_bias=True), "Qwen2, which has no mlp_bias"),
])
def test_export_refuses_configs_without_an_hf_class(changes, match):
  with pytest.raises(ValueError, match=match):
    hf_lib.config_to_hf(ModelConfig(**changes))


def test_bad_rope_scaling_in_model_config():
  with pytest.raises(ValueError, match="rope_type='ntk' must be one of"):
    ModelConfig(rope_scaling={"rope_type": "ntk", "factor": 2.0})
  with pytest.raises(ValueError, match="needs max_position_embeddings"):
    ModelConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
