"""Hugging Face ``config.json`` <-> :class:`ardiff.config.ModelConfig` (Llama / Qwen2 / Qwen3).

Covered: Llama (``attention_bias``, ``mlp_bias``), Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm), RoPE types
``default``/``linear``/``dynamic``/``yarn``/``llama3`` (:mod:`ardiff.rope`), v4 (``rope_scaling``) and v5
(``rope_parameters``) configs. :func:`config_from_hf` raises :class:`UnsupportedCheckpointError` for anything the
ardiff model cannot reproduce exactly (sliding windows that ``transformers`` would apply, partial rotary, non-SwiGLU
MLPs, ...); :func:`config_to_hf` writes the architecture that reproduces a config (:func:`hf_kind`), with ardiff
specific keys under ``config["ardiff"]``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from ardiff.config import DTYPES, ModelConfig

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_ROPE_SCALED = ("linear", "dynamic", "yarn", "llama3")


class UnsupportedCheckpointError(ValueError):
  """The checkpoint uses a feature that the ardiff model does not implement."""


def _rope(hf: Mapping[str, Any], where: str):
  """``(rope_theta, rope_scaling or None)`` from a v4 (``rope_theta`` + ``rope_scaling``) or v5
  (``rope_parameters``) config; the scaling keys are those :mod:`ardiff.rope` computes."""
  params = hf.get("rope_parameters")
  scaling = hf.get("rope_scaling")
  theta = hf.get("rope_theta")
  block: dict = {}
  for b in (scaling, params):  # v5's rope_parameters wins over a legacy rope_scaling
    if not b:
      continue
    if not isinstance(b, Mapping) or any(isinstance(v, Mapping) for v in b.values()):
      raise UnsupportedCheckpointError(f"{where}: rope_parameters/rope_scaling={b!r} is not supported (per-layer "
                                       "RoPE parameters).")
    block.update(b)
  if theta is None:
    theta = block.get("rope_theta")
  theta = float(10000.0 if theta is None else theta)
  rope_type = block.get("rope_type", block.get("type", "default"))
  partial = block.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if partial not in (None, 1, 1.0):
    raise UnsupportedCheckpointError(f"{where}: partial_rotary_factor={partial} is not supported (ardiff rotates "
                                     "the whole head_dim).")
  if rope_type == "default":
    return theta, None
  if rope_type not in _ROPE_SCALED:
    raise UnsupportedCheckpointError(
        f"{where}: rope type {rope_type!r} ({dict(block)}) is not supported; ardiff implements RoPE types "
        f"'default', {', '.join(repr(t) for t in _ROPE_SCALED)}.")
  out = {"rope_type": rope_type, "factor": block.get("factor")}
  if rope_type == "dynamic":
    out["max_position_embeddings"] = hf.get("max_position_embeddings")
  if rope_type in ("yarn", "llama3"):  # as transformers' standardize_rope_params: fall back to the context length
    out["original_max_position_embeddings"] = (hf.get("original_max_position_embeddings")
                                               or block.get("original_max_position_embeddings")
                                               or hf.get("max_position_embeddings"))
  if rope_type == "llama3":
    out.update(low_freq_factor=block.get("low_freq_factor"), high_freq_factor=block.get("high_freq_factor"))
  if rope_type == "yarn":
    if out["factor"] is None and out["original_max_position_embeddings"]:
      out["factor"] = hf["max_position_embeddings"] / out["original_max_position_embeddings"]
    for k in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"):
      if block.get(k) is not None:
        out[k] = block[k]
  from ardiff import rope
  try:
    rope.check_scaling(out, where)
  except ValueError as e:
    raise UnsupportedCheckpointError(str(e)) from None
  return theta, out


def _sliding_window_check(hf: Mapping[str, Any], kind: str, where: str) -> None:
  """Refuses checkpoints in which ``transformers`` would apply a sliding window (ardiff attends to the full
  context). Qwen2/Qwen3 keep ``sliding_window`` (default 4096) only when ``use_sliding_window`` is set, and apply
  it to the layers that ``layer_types`` marks ``sliding_attention`` (default: those from ``max_window_layers``,
  default 28, on)."""
  layer_types = hf.get("layer_types")
  if layer_types and any(t not in ("full_attention", "sliding_attention") for t in layer_types):
    raise UnsupportedCheckpointError(f"{where}: layer_types={sorted(set(layer_types))} is not supported.")
  if kind == "llama":
    if hf.get("sliding_window"):
      raise UnsupportedCheckpointError(f"{where}: sliding_window={hf['sliding_window']} is not supported.")
    return
  window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None
  if window is None:
    return
  first = int(hf.get("max_window_layers", 28))
  if not layer_types:
    layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(int(hf["num_hidden_layers"]))]
  sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
  if sliding:
    raise UnsupportedCheckpointError(
        f"{where}: {kind} with use_sliding_window=True applies a {window}-token sliding window to layers {sliding} "
        "(max_window_layers/layer_types), which ardiff does not implement (it attends to the full context). A "
        "checkpoint whose layers are all full_attention imports.")


def architecture_kind(hf: Mapping[str, Any], where: str = "config.json") -> str:
  """``llama``, ``qwen2`` or ``qwen3`` for an HF config dict; a clear refusal for anything else."""
  archs = list(hf.get("architectures") or [])
  model_type = hf.get("model_type")
  arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
  if arch is not None:
    return SUPPORTED_ARCHITECTURES[arch]
  if not archs and model_type in SUPPORTED_ARCHITECTURES.values():
    return model_type
  raise UnsupportedCheckpointError(
      f"{where}: unsupported architecture {archs or model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
      "and the diffusion families of ardiff.export.families (SDAR, Fast-dLLM v2, Dream, LLaDA).")


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32", where: str = "config.json",
                   kind: Optional[str] = None, **overrides) -> ModelConfig:
  """A :class:`ModelConfig` for an HF ``config.json`` dict; raises :class:`UnsupportedCheckpointError` with the
  reason for anything the ardiff model cannot reproduce exactly. ``kind`` (``llama``/``qwen2``/``qwen3``) overrides
  the architecture read from the config (the diffusion families name their own)."""
  kind = kind or architecture_kind(hf, where)
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}.")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedCheckpointError(f"{where}: hidden_act={act!r} is not supported (ardiff's MLP is SwiGLU/silu).")
  if kind != "llama" and hf.get("mlp_bias"):
    raise UnsupportedCheckpointError(f"{where}: mlp_bias=True is not part of {kind} (Llama only).")
  if int(hf.get("pretraining_tp") or 1) != 1:
    raise UnsupportedCheckpointError(f"{where}: pretraining_tp={hf['pretraining_tp']} is not supported (set 1).")
  _sliding_window_check(hf, kind, where)
  attention_bias = bool(hf.get("attention_bias", False))
  hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = hf.get("head_dim") or hidden // heads
  theta, scaling = _rope(hf, where)
  fields = dict(
      vocab_size=int(hf["vocab_size"]), embed_dim=hidden, num_layers=int(hf["num_hidden_layers"]),
      num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(head_dim),
      mlp_dim=int(hf["intermediate_size"]), rope_theta=theta, rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=kind == "qwen2" or attention_bias, o_bias=kind != "qwen2" and attention_bias,
      mlp_bias=kind == "llama" and bool(hf.get("mlp_bias", False)), qk_norm=kind == "qwen3",
      dtype=dtype, param_dtype=dtype)
  if hf.get("initializer_range") is not None:  # only used to initialise rows added later (e.g. a [MASK])
    fields["init_std"] = float(hf["initializer_range"])
  extra = hf.get("ardiff") or {}
  if extra.get("mask_token_id") is not None:
    fields["mask_token_id"] = int(extra["mask_token_id"])
  fields.update(overrides)
  return ModelConfig(**fields)


def hf_kind(cfg: ModelConfig) -> str:
  """The HF architecture that reproduces ``cfg``: ``qwen3`` (q/k norms), ``qwen2`` (q/k/v biases only) or
  ``llama``; a ValueError for bias combinations no ``transformers`` class has."""
  if cfg.qk_norm:
    if cfg.qkv_bias != cfg.o_bias or cfg.mlp_bias:
      raise ValueError("a model with q/k norms exports as Qwen3, whose attention_bias covers q/k/v and o_proj "
                       f"together and whose MLP has no biases (qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, "
                       f"mlp_bias={cfg.mlp_bias}).")
    return "qwen3"
  if cfg.qkv_bias and not cfg.o_bias:
    if cfg.mlp_bias:
      raise ValueError("qkv_bias without o_bias exports as Qwen2, which has no mlp_bias; set mlp_bias=False.")
    return "qwen2"
  if cfg.o_bias and not cfg.qkv_bias:
    raise ValueError("o_bias without qkv_bias has no transformers architecture (Llama's attention_bias covers "
                     "q/k/v and o_proj together).")
  return "llama"


_HF_NAMES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
             "qwen3": ("Qwen3ForCausalLM", "qwen3")}


def rope_to_hf(cfg: ModelConfig) -> dict:
  """``rope_parameters`` (transformers v5 form) for ``cfg``."""
  d = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    d.update(cfg.rope_scaling_dict)
    d.pop("max_position_embeddings", None)  # dynamic reads it from the top level of config.json
  return d


def config_to_hf(cfg: ModelConfig, *, max_position_embeddings: int = 4096,
                 extra_config: Optional[Mapping[str, Any]] = None) -> dict:
  """An HF ``config.json`` dict (Llama, Qwen2 or Qwen3: :func:`hf_kind`) for ``cfg``."""
  kind = hf_kind(cfg)
  scaling = cfg.rope_scaling_dict or {}
  if scaling.get("rope_type") == "dynamic":  # the NTK base depends on it: keep the imported value
    max_position_embeddings = int(scaling["max_position_embeddings"])
  d = {
      "architectures": [_HF_NAMES[kind][0]], "model_type": _HF_NAMES[kind][1],
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_parameters": rope_to_hf(cfg),
      "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": int(max_position_embeddings),
      "initializer_range": cfg.init_std, "use_cache": True, "dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype,
  }
  if kind in ("qwen2", "qwen3"):
    d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
             layer_types=["full_attention"] * cfg.num_layers)
  if kind == "qwen3":
    d.update(attention_bias=cfg.qkv_bias)
  if kind == "llama":
    d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
  extra = dict(extra_config or {})
  ardiff_extra = dict(extra.pop("ardiff", {}) or {})
  if cfg.mask_token_id is not None:
    ardiff_extra.setdefault("mask_token_id", cfg.mask_token_id)
  d.update(extra)  # top-level HF keys (bos_token_id, eos_token_id, ...)
  if ardiff_extra:
    d["ardiff"] = ardiff_extra
  return d


def read_hf_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {model_dir} is not a Hugging Face model directory.")
  with open(path) as f:
    return json.load(f)
