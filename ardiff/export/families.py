"""Published diffusion LMs as first-class ardiff runs: SDAR, Fast-dLLM v2, Dream and LLaDA checkpoints.

Each family is a known base architecture (Qwen3, Qwen2, Llama) plus what makes it a diffusion model: its attention
mask, block size, [MASK] id, token shift and decoding defaults. :func:`import_family` reads a checkpoint directory
in the family's own layout (its ``config.json`` keys and safetensors names, as its public modeling code expects:
docs/pretrained.md cites the files) and writes an ardiff run directory whose ``config.json`` carries the block
size, [MASK] id and token shift, and whose ``conversion.json`` records the family and its default sampler, so that
``python -m ardiff sample --checkpoint RUN`` decodes it the family's way with no further flags.

==============  ========  =====================  ==========  ======  =================================================
family          base      attention              [MASK] id   shift   default decoding
==============  ========  =====================  ==========  ======  =================================================
sdar            Qwen3     block-causal, B = 4    151669      no      SDAR ``low_confidence_dynamic``, τ = 0.9
fast_dllm_v2    Qwen2     block-causal, B = 32   151665      yes     threshold τ = 0.9, sub-blocks of 8, greedy
dream           Qwen2     bidirectional          151666      yes     top-1 confidence, one token per step
llada           Llama     bidirectional          126336      no      low-confidence top-1 per step, greedy
==============  ========  =====================  ==========  ======  =================================================

The [MASK] id is the checkpoint's ``mask_token_id`` when its config has one, else the family's published id. The
bidirectional families are decoded as one block that spans prompt and answer (``"bidirectional": true`` in the
decoding defaults: ``ardiff sample`` sets the block size to prompt + new tokens), which is the attention their
models were trained with.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional

from ardiff.export.hf_config import UnsupportedCheckpointError


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  base: str  # the ardiff/HF base architecture: llama, qwen2, qwen3
  architectures: tuple  # config.json "architectures" entries that name this family
  model_types: tuple
  bidirectional: bool  # full attention over the whole sequence (Dream, LLaDA) vs block-causal
  block_size_key: Optional[str]  # config.json key holding the block size
  default_block_size: Optional[int]
  default_mask_id: int
  mask_token: str  # the [MASK] token's text in the family's tokenizer
  token_shift: bool
  weighting: str  # the family's training loss weights, for fine-tuning the imported run
  default_seq_len: int  # the context recorded as data.seq_len
  decoding: Mapping[str, Any]


FAMILIES = {
    "sdar": Family("sdar", "qwen3", ("SDARForCausalLM",), ("sdar",), False, "block_size", 4, 151669, "<|MASK|>", False, "p_mask",
                   4096, {"strategy": "dynamic", "threshold": 0.9, "temperature": 1.0, "top_p": 1.0}),
    "fast_dllm_v2": Family("fast_dllm_v2", "qwen2", ("Fast_dLLM_QwenForCausalLM",), ("Fast_dLLM_Qwen",), False,
                           "bd_size", 32, 151665, "|<MASK>|", True, "none", 2048,
                           {"strategy": "threshold", "threshold": 0.9, "sub_block_size": 8, "temperature": 0.0,
                            "top_p": 1.0}),
    "dream": Family("dream", "qwen2", ("DreamModel",), ("Dream",), True, None, None, 151666, "<|mask|>", True, "p_mask", 2048,
                    {"strategy": "topk_confidence", "temperature": 0.2, "top_p": 0.95, "num_tokens": 256}),
    "llada": Family("llada", "llama", ("LLaDAModelLM",), ("llada",), True, None, None, 126336, "<|mdm_mask|>", False, "p_mask", 4096,
                    {"strategy": "topk_confidence", "temperature": 0.0, "top_p": 1.0, "num_tokens": 128}),
}


def detect(hf: Mapping[str, Any], where: str = "config.json") -> Optional[Family]:
  """The family named by a ``config.json`` dict; None for a plain Llama/Qwen2/Qwen3 checkpoint; a clear refusal
  for remote code (``auto_map``) that is neither."""
  archs = set(hf.get("architectures") or [])
  for fam in FAMILIES.values():
    if archs & set(fam.architectures) or (not archs and hf.get("model_type") in fam.model_types):
      return fam
  from ardiff.export.hf_config import SUPPORTED_ARCHITECTURES
  if hf.get("auto_map") and not archs & set(SUPPORTED_ARCHITECTURES):
    known = sorted(a for f in FAMILIES.values() for a in f.architectures)
    raise UnsupportedCheckpointError(
        f"{where}: architectures={sorted(archs)} with remote code (auto_map={dict(hf['auto_map'])}) is not a model "
        f"ardiff knows; supported: {', '.join(SUPPORTED_ARCHITECTURES)} and the diffusion families "
        f"{', '.join(known)}.")
  return None


# --------------------------------------------------------------------------------------------------- LLaDA
# LLaDA (modeling_llada.py, OLMo-derived) names: model.transformer.{wte, blocks.N.*, ln_f, ff_out}; per block
# attn_norm, q/k/v_proj, attn_out, ff_norm, ff_proj (gate), up_proj, ff_out (down).
_LLADA_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ff_norm", "self_attn.q_proj": "q_proj",
                "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
                "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out"}
_LLADA_TOP = {"model.embed_tokens.weight": "model.transformer.wte.weight",
              "model.norm.weight": "model.transformer.ln_f.weight", "lm_head.weight": "model.transformer.ff_out.weight"}


def llada_name(name: str) -> str:
  """The LLaDA checkpoint name of a Llama tensor name (``model.layers.3.mlp.gate_proj.weight`` ->
  ``model.transformer.blocks.3.ff_proj.weight``)."""
  if name in _LLADA_TOP:
    return _LLADA_TOP[name]
  prefix = "model.layers."
  if name.startswith(prefix):
    index, _, rest = name[len(prefix):].partition(".")
    module, _, leaf = rest.rpartition(".")
    if module in _LLADA_LAYER:
      return f"model.transformer.blocks.{index}.{_LLADA_LAYER[module]}.{leaf}"
  return name


def _llada_to_llama(hf: Mapping[str, Any], where: str) -> dict:
  """LLaDA's OLMo-style config as the Llama config it is; refuses the options ardiff's model does not have."""
  must = {"alibi": False, "rope": True, "attention_layer_norm": False, "include_bias": False,
          "include_qkv_bias": False, "input_emb_norm": False, "scale_logits": False, "layer_norm_with_affine": True,
          "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "block_group_size": 1}
  wrong = [f"{k}={hf[k]!r} (ardiff needs {v!r})" for k, v in must.items() if k in hf and hf[k] != v
           and not (k == "include_qkv_bias" and not hf[k])]
  if wrong:
    raise UnsupportedCheckpointError(f"{where}: LLaDA with {', '.join(wrong)} is not supported.")
  if hf.get("multi_query_attention"):
    raise UnsupportedCheckpointError(f"{where}: LLaDA with multi_query_attention=True is not supported.")
  heads = int(hf["n_heads"])
  return {"hidden_size": int(hf["d_model"]), "num_attention_heads": heads,
          "num_key_value_heads": int(hf.get("n_kv_heads") or heads), "num_hidden_layers": int(hf["n_layers"]),
          "intermediate_size": int(hf.get("mlp_hidden_size") or hf.get("mlp_ratio", 4) * int(hf["d_model"])),
          "vocab_size": int(hf.get("embedding_size") or hf["vocab_size"]),  # the rows wte and ff_out really have
          "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-5)), "rope_theta": float(hf.get("rope_theta", 10000.0)),
          "tie_word_embeddings": bool(hf.get("weight_tying", False)),
          "max_position_embeddings": int(hf.get("max_sequence_length", 4096)), "hidden_act": "silu"}


def base_config(fam: Family, hf: Mapping[str, Any], where: str = "config.json") -> dict:
  """The family's ``config.json`` as a config of its base architecture (what :func:`import_hf` reads)."""
  if fam.name == "llada":
    return _llada_to_llama(hf, where)
  d = {k: v for k, v in hf.items() if k not in ("architectures", "auto_map", "model_type")}
  if fam.name == "dream" and d.get("use_sliding_window"):
    raise UnsupportedCheckpointError(f"{where}: Dream with use_sliding_window=True is not supported.")
  return d


def tensor_renamer(fam: Family) -> Optional[Callable[[str], str]]:
  return llada_name if fam.name == "llada" else None


def _tokenizer_mask_id(fam: Family, model_dir: Optional[str]) -> Optional[int]:
  path = os.path.join(model_dir, "tokenizer.json") if model_dir else None
  if not path or not os.path.isfile(path):
    return None
  from tokenizers import Tokenizer
  return Tokenizer.from_file(path).token_to_id(fam.mask_token)


def mask_id(fam: Family, hf: Mapping[str, Any], vocab_size: int, override: Optional[int] = None,
            model_dir: Optional[str] = None) -> int:
  """The [MASK] id: ``override``, else the checkpoint's ``mask_token_id``, else the id of the family's [MASK] token
  in ``model_dir``'s ``tokenizer.json``, else the family's published id."""
  mid = override if override is not None else hf.get("mask_token_id")
  source = "--mask-token-id" if override is not None else "config.json mask_token_id"
  if mid is None:
    mid, source = _tokenizer_mask_id(fam, model_dir), f"{fam.mask_token} in tokenizer.json"
  if mid is None:
    mid, source = fam.default_mask_id, f"{fam.name}'s published [MASK] id"
  mid = int(mid)
  if not 0 <= mid < vocab_size:
    raise ValueError(f"the [MASK] id {mid} ({source}) lies outside the checkpoint's vocabulary of {vocab_size} "
                     "rows; set mask_token_id in its config.json or pass --mask-token-id with the tokenizer's "
                     "[MASK] id.")
  return mid


def block_size(fam: Family, hf: Mapping[str, Any], seq_len: int, override: Optional[int] = None) -> int:
  if override is not None:
    return int(override)
  if fam.bidirectional:
    return int(seq_len)  # one block over the whole context: full attention (MDLM / LLaDA / Dream training)
  return int(hf.get(fam.block_size_key) or fam.default_block_size)


def decoding_defaults(fam: Family, block: int) -> dict:
  """What ``ardiff sample`` uses when no flag says otherwise (``conversion.json``'s ``decoding``)."""
  d = {"sampler": "block_diffusion", "bidirectional": fam.bidirectional, **fam.decoding}
  if not fam.bidirectional:
    d["block_size"] = int(block)
  sub = d.get("sub_block_size")
  if sub is not None and (block % sub or sub >= block):  # keep Fast-dLLM v2's 4 sub-blocks per block
    d["sub_block_size"] = block // 4 if block % 4 == 0 else 1
  return d


def objective_fields(fam: Family, block: int) -> dict:
  return {"kind": "block_diffusion", "block_size": int(block), "token_shift": fam.token_shift,
          "complementary_masks": fam.name == "fast_dllm_v2", "weighting": fam.weighting}
