"""Tensor layouts of Hugging Face Llama / Qwen2 / Qwen3 checkpoints vs ardiff parameters, read and written both ways.

Layouts (HF ``nn.Linear`` stores ``[out, in]``):

=============================  ======================  =============================
HF tensor                      HF shape                ardiff leaf (per layer)
=============================  ======================  =============================
``embed_tokens.weight``        ``[V, D]``              ``embed_tokens/embedding [V, D]``
``q_proj.weight``              ``[H*hd, D]``           ``q_proj/kernel [D, H, hd]``
``q_proj.bias``                ``[H*hd]``              ``q_proj/bias [H, hd]``
``o_proj.weight``              ``[D, H*hd]``           ``o_proj/kernel [H, hd, D]``
``gate_proj/up_proj.weight``   ``[F, D]``              ``kernel [D, F]``
``down_proj.weight``           ``[D, F]``              ``kernel [F, D]``
``lm_head.weight``             ``[V, D]``              ``lm_head/kernel [D, V]``
``o_proj.bias``, MLP biases    ``[D]`` / ``[F]``       same
``q_norm/k_norm.weight``       ``[hd]``                same (Qwen3)
=============================  ======================  =============================

Each spec is ``(ardiff path inside a layer (or the model), HF name or suffix, reader, writer)``: the reader builds a
(sliced) ardiff leaf from the HF tensor (:mod:`ardiff.export.hf_import`), the writer maps an ardiff leaf back to
the HF tensor (:mod:`ardiff.export.hf_export`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ardiff.config import ModelConfig

_LAYER = "model.layers.{i}."


# ------------------------------------------------------------------------------------------- tensor readers
def _rows(s: slice, inner: int) -> slice:
  return slice(s.start * inner, s.stop * inner)


# Each reader maps (get, target index without the layer axis, per-layer target shape) -> numpy array, where
# get(slices) reads that slice of the HF tensor. They never read more than the devices' slice needs.
def _read_identity(get, idx, shape):
  return get(idx)


def _read_transpose(get, idx, shape):  # target [a, b] = hf [b, a].T
  return get((idx[1], idx[0])).T


def _read_in_proj(get, idx, shape):  # target [D, N, hd] from hf [N*hd, D]
  sd, sn, sh = idx
  n_hd = shape[2]
  x = get((_rows(sn, n_hd), sd)).T  # [d, n*hd]
  return x.reshape(x.shape[0], sn.stop - sn.start, n_hd)[:, :, sh]


def _read_in_bias(get, idx, shape):  # target [N, hd] from hf [N*hd]
  sn, sh = idx
  x = get((_rows(sn, shape[1]),))
  return x.reshape(sn.stop - sn.start, shape[1])[:, sh]


def _read_out_proj(get, idx, shape):  # target [N, hd, D] from hf [D, N*hd]
  sn, sh, sd = idx
  n_hd = shape[1]
  x = get((sd, _rows(sn, n_hd))).T  # [n*hd, d]
  return x.reshape(sn.stop - sn.start, n_hd, x.shape[1])[:, sh, :]


def _to_hf_in_proj(x):  # [D, N, hd] -> [N*hd, D]
  return x.reshape(x.shape[0], -1).T


def _to_hf_out_proj(x):  # [N, hd, D] -> [D, N*hd]
  return x.reshape(-1, x.shape[-1]).T


# (ardiff path inside a layer, HF suffix, reader, writer)
_LAYER_SPECS = (
    (("input_layernorm", "weight"), "input_layernorm.weight", _read_identity, lambda x: x),
    (("post_attention_layernorm", "weight"), "post_attention_layernorm.weight", _read_identity, lambda x: x),
    (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", _read_in_proj, _to_hf_in_proj),
    (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", _read_in_proj, _to_hf_in_proj),
    (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", _read_in_proj, _to_hf_in_proj),
    (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", _read_out_proj, _to_hf_out_proj),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", _read_transpose, lambda x: x.T),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", _read_transpose, lambda x: x.T),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", _read_transpose, lambda x: x.T),
)
_BIAS_SPECS = tuple(((("self_attn", p, "bias")), f"self_attn.{p}.bias", _read_in_bias, lambda x: x.reshape(-1))
                    for p in ("q_proj", "k_proj", "v_proj"))
_TOP_SPECS = (
    (("embed_tokens", "embedding"), "model.embed_tokens.weight", _read_identity, lambda x: x),
    (("norm", "weight"), "model.norm.weight", _read_identity, lambda x: x),
)
_LM_HEAD = (("lm_head", "kernel"), "lm_head.weight", _read_transpose, lambda x: x.T)


_O_BIAS_SPECS = ((("self_attn", "o_proj", "bias"), "self_attn.o_proj.bias", _read_identity, lambda x: x),)
_MLP_BIAS_SPECS = tuple(((("mlp", p, "bias")), f"mlp.{p}.bias", _read_identity, lambda x: x)
                        for p in ("gate_proj", "up_proj", "down_proj"))
_QK_NORM_SPECS = tuple(((("self_attn", p, "weight")), f"self_attn.{p}.weight", _read_identity, lambda x: x)
                       for p in ("q_norm", "k_norm"))


def _layer_specs(cfg: ModelConfig):
  return (_LAYER_SPECS + (_BIAS_SPECS if cfg.qkv_bias else ()) + (_O_BIAS_SPECS if cfg.o_bias else ())
          + (_MLP_BIAS_SPECS if cfg.mlp_bias else ()) + (_QK_NORM_SPECS if cfg.qk_norm else ()))


def layer_shapes(cfg: ModelConfig):
  """``(ardiff per-layer shape, HF shape)`` of every per-layer HF suffix."""
  D, H, K, hd, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  return {
      "input_layernorm.weight": ((D,), (D,)), "post_attention_layernorm.weight": ((D,), (D,)),
      "self_attn.q_proj.weight": ((D, H, hd), (H * hd, D)), "self_attn.k_proj.weight": ((D, K, hd), (K * hd, D)),
      "self_attn.v_proj.weight": ((D, K, hd), (K * hd, D)), "self_attn.o_proj.weight": ((H, hd, D), (D, H * hd)),
      "mlp.gate_proj.weight": ((D, F), (F, D)), "mlp.up_proj.weight": ((D, F), (F, D)),
      "mlp.down_proj.weight": ((F, D), (D, F)),
      "self_attn.q_proj.bias": ((H, hd), (H * hd,)), "self_attn.k_proj.bias": ((K, hd), (K * hd,)),
      "self_attn.v_proj.bias": ((K, hd), (K * hd,)), "self_attn.o_proj.bias": ((D,), (D,)),
      "mlp.gate_proj.bias": ((F,), (F,)), "mlp.up_proj.bias": ((F,), (F,)), "mlp.down_proj.bias": ((D,), (D,)),
      "self_attn.q_norm.weight": ((hd,), (hd,)), "self_attn.k_norm.weight": ((hd,), (hd,))}


def _set(tree: dict, path: Sequence[str], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: Sequence[str]):
  for k in path:
    tree = tree[k]
  return tree
