"""Hugging Face Llama / Qwen2 checkpoints <-> ardiff parameters (safetensors, no torch at run time).

``import_hf(model_dir)`` reads ``config.json`` and ``*.safetensors`` (single file or sharded through
``model.safetensors.index.json``) and returns ``(ModelConfig, params)``. With ``mesh=`` every array is created
directly in its target ``NamedSharding`` by :func:`jax.make_array_from_callback`; each device's callback reads only
its own slice of the tensor from the safetensors file (``safe_open(...).get_slice``), so no host ever holds the
whole model.

``export_hf(params, cfg, out_dir)`` writes ``config.json`` (``LlamaForCausalLM``, or ``Qwen2ForCausalLM`` when
``cfg.qkv_bias``) plus ``model.safetensors`` that ``transformers`` loads with ``from_pretrained``. Extra, ardiff
specific keys (block size, [MASK] id, decoding defaults) go under ``config["ardiff"]`` via ``extra_config``.

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
=============================  ======================  =============================
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from ardiff.checkpoints import tree_io
from ardiff.config import DTYPES, ModelConfig

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
DEFAULT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                           "vocab.json", "merges.txt", "generation_config.json")

_LAYER = "model.layers.{i}."


class UnsupportedCheckpointError(ValueError):
  """The checkpoint uses a feature that the ardiff model does not implement."""


# ----------------------------------------------------------------------------------------------- config mapping
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


# ------------------------------------------------------------------------------------------- tensor readers
_norm = tree_io.norm_index  # shared with the params-directory reader (ardiff/checkpoints/tree_io.py)


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


def _layer_specs(cfg: ModelConfig):
  return _LAYER_SPECS + (_BIAS_SPECS if cfg.qkv_bias else ())


def _set(tree: dict, path: Sequence[str], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: Sequence[str]):
  for k in path:
    tree = tree[k]
  return tree


class _SafetensorsDir:
  """Lazy, sliced access to the tensors of an HF model directory (one handle per file, opened on first use)."""

  def __init__(self, model_dir: str, stack: contextlib.ExitStack):
    from safetensors import safe_open
    self._open = lambda path: stack.enter_context(safe_open(path, framework="numpy"))
    self._handles: Dict[str, Any] = {}
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {k: os.path.join(model_dir, v) for k, v in weight_map.items()}
    else:
      paths = sorted(os.path.join(model_dir, n) for n in os.listdir(model_dir) if n.endswith(".safetensors"))
      if not paths:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files (and no model.safetensors.index.json). "
                                "Save the model with save_pretrained(..., safe_serialization=True).")
      self.files = {}
      for p in paths:
        for k in self._handle(p).keys():
          self.files[k] = p

  def _handle(self, path):
    if path not in self._handles:
      self._handles[path] = self._open(path)
    return self._handles[path]

  def __contains__(self, name):
    return name in self.files

  def shape(self, name) -> Tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def _slice(self, name):
    if name not in self.files:
      raise KeyError(f"tensor {name!r} not found in the checkpoint (it has e.g. {sorted(self.files)[:5]}).")
    return self._handle(self.files[name]).get_slice(name)

  def getter(self, name) -> Callable:
    sl = self._slice(name)
    shape = tuple(sl.get_shape())
    return lambda idx: np.asarray(sl[_norm(idx, shape)])


def _leaf_plan(cfg: ModelConfig, st: _SafetensorsDir):
  """``[(ardiff path, per-layer HF names or None, HF name or None, reader, per-layer target shape)]``."""
  D, H, K, hd, F, V = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  layer_shapes = {
      "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
      "self_attn.q_proj.weight": (D, H, hd), "self_attn.k_proj.weight": (D, K, hd),
      "self_attn.v_proj.weight": (D, K, hd), "self_attn.o_proj.weight": (H, hd, D),
      "mlp.gate_proj.weight": (D, F), "mlp.up_proj.weight": (D, F), "mlp.down_proj.weight": (F, D),
      "self_attn.q_proj.bias": (H, hd), "self_attn.k_proj.bias": (K, hd), "self_attn.v_proj.bias": (K, hd)}
  hf_shapes = {
      "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
      "self_attn.q_proj.weight": (H * hd, D), "self_attn.k_proj.weight": (K * hd, D),
      "self_attn.v_proj.weight": (K * hd, D), "self_attn.o_proj.weight": (D, H * hd),
      "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F),
      "self_attn.q_proj.bias": (H * hd,), "self_attn.k_proj.bias": (K * hd,), "self_attn.v_proj.bias": (K * hd,)}
  plan = []
  for path, suffix, reader, _ in _layer_specs(cfg):
    names = [_LAYER.format(i=i) + suffix for i in range(cfg.num_layers)]
    for n in names:
      if st.shape(n) != hf_shapes[suffix]:
        raise ValueError(f"{n}: shape {st.shape(n)} does not match config.json (expected {hf_shapes[suffix]}).")
    plan.append((path, names, None, reader, layer_shapes[suffix]))
  if not cfg.qkv_bias and _LAYER.format(i=0) + "self_attn.q_proj.bias" in st:
    raise UnsupportedCheckpointError("the checkpoint has q/k/v biases but its config is not Qwen2-style.")
  top = [(("embed_tokens", "embedding"), "model.embed_tokens.weight", _read_identity, (V, D)),
         (("norm", "weight"), "model.norm.weight", _read_identity, (D,))]
  if not cfg.tie_embeddings:
    if "lm_head.weight" not in st:
      raise ValueError("tie_word_embeddings is false but the checkpoint has no lm_head.weight.")
    top.append((("lm_head", "kernel"), "lm_head.weight", _read_transpose, (D, V)))
  expected_hf = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
  for path, name, reader, shape in top:
    if st.shape(name) != expected_hf[name]:
      raise ValueError(f"{name}: shape {st.shape(name)} does not match config.json (expected {expected_hf[name]}).")
    plan.append((path, None, name, reader, shape))
  return plan


_fit_sharding = tree_io.fit_sharding


def _read_tree(model_dir: str, cfg: ModelConfig, shardings=None) -> dict:
  np_dtype = np.dtype(DTYPES[cfg.param_dtype])
  params: dict = {}
  with contextlib.ExitStack() as stack:
    st = _SafetensorsDir(model_dir, stack)
    for path, layer_names, name, reader, shape in _leaf_plan(cfg, st):
      if layer_names is None:
        get = st.getter(name)
        read = lambda idx, get=get, reader=reader, shape=shape: reader(get, _norm(idx, shape), shape)
        full_shape, entries = shape, [(path, read)]
      else:
        getters = [st.getter(n) for n in layer_names]

        def read_stack(idx, getters=getters, reader=reader, shape=shape):
          idx = _norm(idx, (len(getters),) + shape)
          inner = idx[1:]
          return np.stack([reader(getters[i], inner, shape) for i in range(idx[0].start, idx[0].stop)])

        if cfg.scan_layers:
          full_shape, entries = (cfg.num_layers,) + shape, [(("layers",) + path, read_stack)]
        else:
          full_shape = shape
          entries = [((f"layers_{i}",) + path,
                       lambda idx, g=getters[i], reader=reader, shape=shape: reader(g, _norm(idx, shape), shape))
                      for i in range(cfg.num_layers)]
      for leaf_path, read in entries:
        if shardings is None:
          value = jax.numpy.asarray(read((slice(None),) * len(full_shape)).astype(np_dtype))
        else:
          sh = _fit_sharding(_get(shardings, leaf_path), full_shape)
          value = jax.make_array_from_callback(full_shape, sh,
                                               lambda idx, read=read: read(idx).astype(np_dtype))
        _set(params, leaf_path, value)
  return params


def read_hf_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {model_dir} is not a Hugging Face model directory.")
  with open(path) as f:
    return json.load(f)


def import_hf(model_dir: str, *, mesh=None, rules=None, dtype: str = "float32",
              **config_overrides) -> Tuple[ModelConfig, dict]:
  """``(ModelConfig, params)`` of a Hugging Face Llama/Qwen2 directory (``config.json`` + ``*.safetensors``).

  ``dtype`` is the parameter (and compute) dtype. ``config_overrides`` replace :class:`ModelConfig` fields that
  do not change the weights (``scan_layers``, ``attention_impl``, ``remat_policy``, ``dtype`` ...). With ``mesh``
  (and optionally ``rules``, default :data:`ardiff.sharding.DEFAULT_RULES`) every array is created straight into
  its ``NamedSharding``, each device reading only its slice; a dimension that the mesh axes do not divide is
  replicated instead (with a warning).
  """
  model_dir = os.path.abspath(os.path.expanduser(os.fspath(model_dir)))
  cfg = config_from_hf(read_hf_config(model_dir), dtype=dtype, where=os.path.join(model_dir, "config.json"),
                       **config_overrides)
  shardings = None
  if mesh is not None:
    from ardiff import sharding as sharding_lib
    from ardiff.model import Transformer
    _, shardings = sharding_lib.abstract_params_and_shardings(Transformer(cfg), mesh,
                                                              rules or sharding_lib.DEFAULT_RULES)
  return cfg, _read_tree(model_dir, cfg, shardings)


# ------------------------------------------------------------------------------------------------- export
def params_to_hf_tensors(params: Mapping, cfg: ModelConfig) -> Dict[str, np.ndarray]:
  """HF-named numpy tensors (``[out, in]`` layouts) for ardiff ``params`` (scanned or unscanned layers)."""
  params = jax.device_get(params)
  scanned = "layers" in params
  out: Dict[str, np.ndarray] = {}
  for path, suffix, _, write in _layer_specs(cfg):
    stacked = np.asarray(_get(params["layers"], path)) if scanned else None
    for i in range(cfg.num_layers):
      x = stacked[i] if scanned else np.asarray(_get(params[f"layers_{i}"], path))
      out[_LAYER.format(i=i) + suffix] = np.ascontiguousarray(write(x))
  for path, name, _, write in _TOP_SPECS + (() if cfg.tie_embeddings else (_LM_HEAD,)):
    out[name] = np.ascontiguousarray(write(np.asarray(_get(params, path))))
  return out


def export_hf(params: Mapping, cfg: ModelConfig, out_dir: str, *, tokenizer_files: Iterable[str] = (),
              extra_config: Optional[Mapping[str, Any]] = None, max_position_embeddings: int = 4096,
              overwrite: bool = False) -> str:
  """Writes a ``transformers``-loadable directory: ``config.json`` + ``model.safetensors`` (+ tokenizer files).

  ``extra_config``: top-level keys merged into ``config.json`` (``bos_token_id``, ``eos_token_id``, ...); its
  ``"ardiff"`` entry (e.g. ``{"block_size": 4, "mask_token_id": 258, "decoding": {...}}``) is kept under
  ``config["ardiff"]`` (``mask_token_id`` defaults to ``cfg.mask_token_id``). ``tokenizer_files``: paths of files
  (or ``(path, name)`` to rename the copy), or directories whose known tokenizer files (``tokenizer.json``, ...)
  are copied; a ``generation_config.json`` among them is merged with ours (:func:`_generation_config`: [MASK] in
  ``suppress_tokens``). The directory appears only when everything is written
  (:func:`ardiff.checkpoints.staging.staged_output`); a non-empty ``out_dir`` is refused unless ``overwrite``.
  Returns ``out_dir``.
  """
  from safetensors.numpy import save_file

  from ardiff.checkpoints import staging as io_lib
  out_dir = io_lib.check_output_dir(out_dir, overwrite=overwrite)
  if isinstance(tokenizer_files, (str, os.PathLike)):
    tokenizer_files = [tokenizer_files]
  copies = []  # resolved before anything is written, so a missing file fails early
  for src in tokenizer_files:
    name = None
    if isinstance(src, tuple):  # (path, name in the output directory), e.g. (".../my.model", "tokenizer.model")
      src, name = src
    src = io_lib.clean_path(src)
    if os.path.isdir(src):
      copies += [(os.path.join(src, n), n) for n in DEFAULT_TOKENIZER_FILES if os.path.exists(os.path.join(src, n))]
    elif os.path.exists(src):
      copies.append((src, name or os.path.basename(src)))
    else:
      raise FileNotFoundError(f"tokenizer file {src} not found.")
  from ardiff.checkpoints import params_dir as params_lib
  params_lib.check_params_match(params, cfg.replace(scan_layers="layers" in params))
  hf_config = config_to_hf(cfg, max_position_embeddings=max_position_embeddings, extra_config=extra_config)
  tensors = params_to_hf_tensors(params, cfg)
  generation = _generation_config(cfg, hf_config, [src for src, name in copies if name == "generation_config.json"])
  copies = [(src, name) for src, name in copies if name != "generation_config.json"]
  with io_lib.staged_output(out_dir, overwrite=overwrite) as tmp:
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    if generation is not None:
      with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    for src, name in copies:
      shutil.copy(src, os.path.join(tmp, name))
  return out_dir


def _generation_config(cfg: ModelConfig, hf_config: Mapping[str, Any], sources: list) -> Optional[dict]:
  """``generation_config.json`` for the export: the source's (if one is copied) with [MASK] in ``suppress_tokens``.

  A model with a [MASK] row would otherwise let ``transformers``' AR ``generate`` emit [MASK], a token it was never
  trained to predict as a next token. None when there is neither a mask token nor a source file.
  """
  generation = None
  if sources:
    with open(sources[-1]) as f:
      generation = json.load(f)
  if cfg.mask_token_id is None:
    return generation
  generation = dict(generation or {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                   if hf_config.get(k) is not None})
  suppress = list(generation.get("suppress_tokens") or [])
  generation["suppress_tokens"] = suppress + ([cfg.mask_token_id] if cfg.mask_token_id not in suppress else [])
  return generation
