"""Hugging Face import/export: logits parity with `transformers` (Llama and Qwen2, tied and untied), bit-exact round
trips, sharded loading straight into NamedShardings, and clear errors for unsupported or corrupt checkpoints.

The parity tests need ``torch`` and ``transformers`` (CPU builds, pinned in requirements-dev.txt).
"""

import json
import os

import jax
import numpy as np
import pytest

from ardiff import masks, sharding
from ardiff.config import ModelConfig
from ardiff.export import hf as hf_lib
from ardiff.model import Transformer, init_params
from tests.hf_testing import torch_and_transformers as _torch

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128)
ROPE = {"rope_type": "default", "rope_theta": 500.0}


def _make_hf(arch, out_dir, *, tie=False, seed=0):
  torch, transformers = _torch()
  cls_cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
  cls_model = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[arch]
  cfg = cls_cfg(**TINY, tie_word_embeddings=tie, rope_parameters=dict(ROPE))
  torch.manual_seed(seed)
  model = cls_model(cfg).eval()
  with torch.no_grad():  # non-trivial norms and biases, larger weights
    for _, p in model.named_parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.save_pretrained(out_dir, safe_serialization=True)
  return model


def _hf_logits(model, tokens):
  torch, _ = _torch()
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def _load_hf(path):
  _, transformers = _torch()
  return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                           dtype="float32").eval()


def _logits(cfg, params, tokens):
  return np.asarray(jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t, mask=masks.Causal()).logits)(
      params, tokens))


TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 11)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  _torch()
  out = {}
  for arch, tie in (("llama", False), ("qwen2", False), ("llama", True)):
    d = str(tmp_path_factory.mktemp(f"hf_{arch}_{tie}"))
    out[(arch, tie)] = (d, _make_hf(arch, d, tie=tie))
  return out


@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", False), ("llama", True)])
def test_import_hf_logits_match(hf_models, arch, tie):
  d, model = hf_models[(arch, tie)]
  cfg, params = hf_lib.import_hf(d)
  assert cfg.qkv_bias == (arch == "qwen2") and cfg.tie_embeddings == tie
  assert cfg.num_kv_heads == 2 and cfg.head_dim == 16 and cfg.rope_theta == 500.0
  assert ("lm_head" in params) == (not tie)
  np.testing.assert_allclose(_logits(cfg, params, TOKENS), _hf_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_import_unscanned_matches(hf_models):
  d, model = hf_models[("llama", False)]
  cfg, params = hf_lib.import_hf(d, scan_layers=False)
  assert "layers_1" in params and "layers" not in params
  np.testing.assert_allclose(_logits(cfg, params, TOKENS), _hf_logits(model, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("qkv_bias,tie", [(False, False), (True, False), (False, True)])
def test_export_hf_loads_in_transformers(tmp_path, qkv_bias, tie):
  cfg = ModelConfig(vocab_size=97, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                    qkv_bias=qkv_bias, tie_embeddings=tie, rope_theta=500.0, init_std=0.1)
  params = init_params(cfg, jax.random.key(1))
  if qkv_bias:  # biases start at zero; make them matter
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if "bias" in jax.tree_util.keystr(path) else x, params)
  out = hf_lib.export_hf(params, cfg, tmp_path / "hf", extra_config={"ardiff": {"block_size": 4}})
  hf_cfg = json.load(open(os.path.join(out, "config.json")))
  assert hf_cfg["architectures"] == ["Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"]
  assert hf_cfg["ardiff"]["block_size"] == 4
  model = _load_hf(out)
  np.testing.assert_allclose(_hf_logits(model, TOKENS), _logits(cfg, params, TOKENS), atol=1e-4, rtol=0)
  # round trip: import(export(p)) is bit-exact
  cfg2, params2 = hf_lib.import_hf(out, init_std=cfg.init_std)
  assert cfg2 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_export_block_diffusion_metadata_and_tokenizer(tmp_path):
  cfg = ModelConfig(vocab_size=50, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                    mask_token_id=49)
  params = init_params(cfg, jax.random.key(0))
  tok = tmp_path / "tokenizer.json"
  tok.write_text("{}")
  out = hf_lib.export_hf(params, cfg, tmp_path / "hf", tokenizer_files=[str(tok)],
                         extra_config={"eos_token_id": 2, "ardiff": {"block_size": 8, "decoding": {"steps": 8}}})
  hf_cfg = json.load(open(os.path.join(out, "config.json")))
  assert hf_cfg["ardiff"] == {"block_size": 8, "decoding": {"steps": 8}, "mask_token_id": 49}
  assert hf_cfg["eos_token_id"] == 2 and os.path.exists(os.path.join(out, "tokenizer.json"))
  cfg2, _ = hf_lib.import_hf(out)
  assert cfg2.mask_token_id == 49
  assert json.load(open(os.path.join(out, "generation_config.json"))) == {"eos_token_id": 2, "suppress_tokens": [49]}
  # A source generation config is kept, with [MASK] added to its suppressed tokens.
  src = tmp_path / "generation_config.json"
  src.write_text(json.dumps({"eos_token_id": 2, "do_sample": True, "suppress_tokens": [7]}))
  out = hf_lib.export_hf(params, cfg, tmp_path / "hf2", tokenizer_files=[str(src)])
  assert json.load(open(os.path.join(out, "generation_config.json"))) == {
      "eos_token_id": 2, "do_sample": True, "suppress_tokens": [7, 49]}


def test_transformers_generate_never_emits_mask(tmp_path):
  """The exported generation config keeps [MASK] out of `transformers`' AR generate, even where it is the argmax."""
  cfg = ModelConfig(vocab_size=50, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                    mask_token_id=49, init_std=0.1)
  params = init_params(cfg, jax.random.key(0))
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 49].set(0.0)
  params["norm"]["weight"] = params["norm"]["weight"] * 0.0 + 1.0
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[0, 49].set(100.0)  # [MASK] wins whenever h_0 > ~0
  prompt = np.array([[1, 2, 3]], np.int32)
  out = hf_lib.export_hf(params, cfg, tmp_path / "hf")
  torch, _ = _torch()
  model = _load_hf(out)
  raw = _hf_logits(model, prompt)[0, -1]
  assert int(np.argmax(raw)) == 49, "the test needs [MASK] to be the raw argmax"
  with torch.no_grad():
    gen = model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=6, do_sample=False)
  new = gen[0, prompt.shape[1]:].tolist()
  assert len(new) >= 1 and 49 not in new, new


def test_sharded_import_equals_unsharded(tmp_path):
  # No torch needed: write the HF layout with ardiff's own exporter, including a sharded index.
  cfg = ModelConfig(vocab_size=97, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                    qkv_bias=True)
  params = init_params(cfg, jax.random.key(2))
  d = str(tmp_path / "hf")
  hf_lib.export_hf(params, cfg, d)
  _split_into_shards(d)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  cfg_s, sharded = hf_lib.import_hf(d, mesh=mesh)
  _, plain = hf_lib.import_hf(d)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(plain)):
    assert isinstance(a.sharding, jax.sharding.NamedSharding), path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  q = sharded["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, H, hd]: embed->fsdp, heads->tensor
  assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
  assert sharding.replicated_fraction(sharded) < 0.5
  np.testing.assert_allclose(_logits(cfg_s, sharded, TOKENS), _logits(cfg_s, plain, TOKENS), atol=1e-5)


def _split_into_shards(d):
  """Rewrites model.safetensors as two files + model.safetensors.index.json (the HF sharded layout)."""
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(d, "model.safetensors"))
  os.remove(os.path.join(d, "model.safetensors"))
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    fname = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({n: tensors[n] for n in part}, os.path.join(d, fname), metadata={"format": "pt"})
    weight_map.update({n: fname for n in part})
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _write_config(d, **changes):
  base = dict(TINY, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu")
  base.update(changes)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(base, f)
  return d


@pytest.mark.parametrize("changes,match", [
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "unsupported architecture"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "llama3' needs low_freq_factor, high_freq_factor"),
    (dict(rope_parameters={"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}), "rope type 'longrope'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True, max_window_layers=1),
     r"sliding window to layers \[1\]"),
])
def test_bad_config_errors_clearly(tmp_path, changes, match):
  d = _write_config(str(tmp_path / "bad"), **changes)
  with pytest.raises(hf_lib.UnsupportedCheckpointError, match=match):
    hf_lib.import_hf(d)


def test_missing_files_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_lib.import_hf(str(tmp_path))
  d = _write_config(str(tmp_path / "noweights"))
  with pytest.raises(FileNotFoundError, match="safetensors"):
    hf_lib.import_hf(d)


def test_corrupt_checkpoint_errors(tmp_path):
  from safetensors.numpy import load_file, save_file
  cfg = ModelConfig(vocab_size=97, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
  d = hf_lib.export_hf(init_params(cfg, jax.random.key(0)), cfg, str(tmp_path / "hf"))
  f = os.path.join(d, "model.safetensors")
  tensors = load_file(f)
  save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}, f)
  with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight' not found in the checkpoint"):
    hf_lib.import_hf(d)
  tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:100]
  save_file(tensors, f)
  with pytest.raises(ValueError, match=r"up_proj.weight: shape \(100, 64\) does not match config.json "
                                       r"\(expected \(128, 64\)\)"):
    hf_lib.import_hf(d)
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((128, 64), np.float32)
  tensors.pop("lm_head.weight")
  save_file(tensors, f)
  with pytest.raises(ValueError, match="tie_word_embeddings is false but the checkpoint has no lm_head.weight"):
    hf_lib.import_hf(d)


def test_export_refuses_populated_dir(tmp_path):
  cfg = ModelConfig(vocab_size=50, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  params = init_params(cfg, jax.random.key(0))
  d = hf_lib.export_hf(params, cfg, str(tmp_path / "hf"))
  before = {n: os.path.getmtime(os.path.join(d, n)) for n in os.listdir(d)}
  with pytest.raises(FileExistsError, match="--overwrite"):
    hf_lib.export_hf(params, cfg.replace(rms_norm_eps=1e-3), d)
  assert {n: os.path.getmtime(os.path.join(d, n)) for n in os.listdir(d)} == before
  hf_lib.export_hf(params, cfg.replace(rms_norm_eps=1e-3), d, overwrite=True)
  assert json.load(open(os.path.join(d, "config.json")))["rms_norm_eps"] == 1e-3
