"""Hugging Face ``config.json`` <-> :class:`ardiff.config.ModelConfig` (Llama / Qwen2).

:func:`config_from_hf` raises :class:`UnsupportedCheckpointError` for anything the ardiff model cannot reproduce
exactly (RoPE scaling, sliding windows, non-SwiGLU MLPs, ...); :func:`config_to_hf` writes ``LlamaForCausalLM``, or
``Qwen2ForCausalLM`` when ``cfg.qkv_bias``, with ardiff specific keys under ``config["ardiff"]``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from ardiff.config import DTYPES, ModelConfig

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


class UnsupportedCheckpointError(ValueError):
  """The checkpoint uses a feature that the ardiff model does not implement."""


def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
  """rope_theta from a v4 (``rope_theta`` + ``rope_scaling``) or v5 (``rope_parameters``) config."""
  params = hf.get("rope_parameters")
  scaling = hf.get("rope_scaling")
  theta = hf.get("rope_theta")
  for block in (params, scaling):
    if not block:
      continue
    if not isinstance(block, Mapping):
      raise UnsupportedCheckpointError(f"{where}: rope_parameters/rope_scaling={block!r} is not supported.")
    rope_type = block.get("rope_type", block.get("type", "default"))
    if rope_type != "default":
      raise UnsupportedCheckpointError(
          f"{where}: rope type {rope_type!r} ({dict(block)}) is not supported; ardiff implements plain RoPE "
          "(rope_type 'default') only. Convert a checkpoint without RoPE scaling (llama3/yarn/linear/dynamic).")
    if theta is None and "rope_theta" in block:
      theta = block["rope_theta"]
  return float(10000.0 if theta is None else theta)


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32", where: str = "config.json",
                   **overrides) -> ModelConfig:
  """A :class:`ModelConfig` for an HF ``config.json`` dict; raises :class:`UnsupportedCheckpointError` with the
  reason for anything the ardiff model cannot reproduce exactly."""
  archs = list(hf.get("architectures") or [])
  model_type = hf.get("model_type")
  arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
  if arch is None:
    if not archs and model_type in SUPPORTED_ARCHITECTURES.values():
      arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[model_type]
    else:
      raise UnsupportedCheckpointError(
          f"{where}: unsupported architecture {archs or model_type!r}; supported: "
          f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
  kind = SUPPORTED_ARCHITECTURES[arch]
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPES)}.")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedCheckpointError(f"{where}: hidden_act={act!r} is not supported (ardiff's MLP is SwiGLU/silu).")
  if hf.get("mlp_bias"):
    raise UnsupportedCheckpointError(f"{where}: mlp_bias=True is not supported (ardiff's MLP has no biases).")
  if kind == "llama" and hf.get("attention_bias"):
    raise UnsupportedCheckpointError(
        f"{where}: Llama with attention_bias=True (biases on q/k/v *and* o_proj) is not supported; ardiff has "
        "q/k/v biases only (Qwen2 style).")
  if kind == "qwen2" and hf.get("use_sliding_window"):
    raise UnsupportedCheckpointError(f"{where}: Qwen2 with use_sliding_window=True is not supported "
                                     "(ardiff attends to the full context).")
  layer_types = hf.get("layer_types")
  if layer_types and any(t != "full_attention" for t in layer_types) and (kind != "qwen2" or
                                                                          hf.get("use_sliding_window")):
    raise UnsupportedCheckpointError(f"{where}: layer_types={sorted(set(layer_types))} is not supported.")
  hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = hf.get("head_dim") or hidden // heads
  fields = dict(
      vocab_size=int(hf["vocab_size"]), embed_dim=hidden, num_layers=int(hf["num_hidden_layers"]),
      num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(head_dim),
      mlp_dim=int(hf["intermediate_size"]), rope_theta=_rope_theta(hf, where),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=kind == "qwen2", dtype=dtype, param_dtype=dtype)
  if hf.get("initializer_range") is not None:  # only used to initialise rows added later (e.g. a [MASK])
    fields["init_std"] = float(hf["initializer_range"])
  extra = hf.get("ardiff") or {}
  if extra.get("mask_token_id") is not None:
    fields["mask_token_id"] = int(extra["mask_token_id"])
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig, *, max_position_embeddings: int = 4096,
                 extra_config: Optional[Mapping[str, Any]] = None) -> dict:
  """An HF ``config.json`` dict (Llama, or Qwen2 when ``cfg.qkv_bias``) for ``cfg``."""
  qwen = cfg.qkv_bias
  d = {
      "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
      "model_type": "qwen2" if qwen else "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": int(max_position_embeddings),
      "initializer_range": cfg.init_std, "use_cache": True, "dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype,
  }
  if qwen:
    d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
             layer_types=["full_attention"] * cfg.num_layers)
  else:
    d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
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
