"""Hugging Face Llama / Qwen2 / Qwen3 directory -> ``(ModelConfig, params)`` (safetensors, no torch).

``import_hf(model_dir)`` reads ``config.json`` and ``*.safetensors`` (single file or sharded through
``model.safetensors.index.json``) and returns ``(ModelConfig, params)``. With ``mesh=`` every array is created
directly in its target ``NamedSharding`` by :func:`jax.make_array_from_callback`; each device's callback reads only
its own slice of the tensor from the safetensors file (``safe_open(...).get_slice``), so no host ever holds the
whole model. Layouts: :mod:`ardiff.export.hf_layout`.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np

from ardiff.checkpoints import tree_io
from ardiff.config import DTYPES, ModelConfig
from ardiff.export.hf_config import UnsupportedCheckpointError, config_from_hf, read_hf_config
from ardiff.export.hf_layout import _LAYER, _get, _layer_specs, _read_identity, _read_transpose, _set, layer_shapes

_norm = tree_io.norm_index  # shared with the params-directory reader (ardiff/checkpoints/tree_io.py)


class _SafetensorsDir:
  """Lazy, sliced access to the tensors of an HF model directory (one handle per file, opened on first use)."""

  def __init__(self, model_dir: str, stack: contextlib.ExitStack, rename: Optional[Callable[[str], str]] = None):
    from safetensors import safe_open
    self._open = lambda path: stack.enter_context(safe_open(path, framework="numpy"))
    self._rename = rename or (lambda name: name)  # Llama/Qwen name -> the name on disk (LLaDA has its own)
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
    return self._rename(name) in self.files

  def shape(self, name) -> Tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def _slice(self, name):
    name = self._rename(name)
    if name not in self.files:
      raise KeyError(f"tensor {name!r} not found in the checkpoint (it has e.g. {sorted(self.files)[:5]}).")
    return self._handle(self.files[name]).get_slice(name)

  def getter(self, name) -> Callable:
    sl = self._slice(name)
    shape = tuple(sl.get_shape())
    return lambda idx: np.asarray(sl[_norm(idx, shape)])


def _leaf_plan(cfg: ModelConfig, st: _SafetensorsDir):
  """``[(ardiff path, per-layer HF names or None, HF name or None, reader, per-layer target shape)]``."""
  D, V = cfg.embed_dim, cfg.vocab_size
  shapes = layer_shapes(cfg)
  plan = []
  for path, suffix, reader, _ in _layer_specs(cfg):
    names = [_LAYER.format(i=i) + suffix for i in range(cfg.num_layers)]
    for n in names:
      if st.shape(n) != shapes[suffix][1]:
        raise ValueError(f"{n}: shape {st.shape(n)} does not match config.json (expected {shapes[suffix][1]}).")
    plan.append((path, names, None, reader, shapes[suffix][0]))
  expected = {suffix for _, suffix, _, _ in _layer_specs(cfg)}
  stray = sorted(s for s in shapes if s not in expected and _LAYER.format(i=0) + s in st)
  if stray:
    raise UnsupportedCheckpointError(f"the checkpoint has {', '.join(stray)} (layer 0) but its config.json does "
                                     "not ask for them (attention_bias / mlp_bias / architecture); they would be "
                                     "ignored, so the import is refused.")
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


def _read_tree(model_dir: str, cfg: ModelConfig, shardings=None, rename=None) -> dict:
  np_dtype = np.dtype(DTYPES[cfg.param_dtype])
  params: dict = {}
  with contextlib.ExitStack() as stack:
    st = _SafetensorsDir(model_dir, stack, rename)
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


def import_hf(model_dir: str, *, mesh=None, rules=None, dtype: str = "float32", hf_config: Optional[dict] = None,
              kind: Optional[str] = None, rename: Optional[Callable[[str], str]] = None,
              **config_overrides) -> Tuple[ModelConfig, dict]:
  """``(ModelConfig, params)`` of a Hugging Face Llama/Qwen2 directory (``config.json`` + ``*.safetensors``).

  ``dtype`` is the parameter (and compute) dtype. ``config_overrides`` replace :class:`ModelConfig` fields that
  do not change the weights (``scan_layers``, ``attention_impl``, ``remat_policy``, ``dtype`` ...). With ``mesh``
  (and optionally ``rules``, default :data:`ardiff.sharding.DEFAULT_RULES`) every array is created straight into
  its ``NamedSharding``, each device reading only its slice; a dimension that the mesh axes do not divide is
  replicated instead (with a warning).

  The diffusion families (:mod:`ardiff.export.families`) pass their checkpoint's config translated to the base
  architecture (``hf_config``, ``kind``) and ``rename``, which maps each Llama/Qwen tensor name to the one on disk.
  """
  model_dir = os.path.abspath(os.path.expanduser(os.fspath(model_dir)))
  raw = read_hf_config(model_dir) if hf_config is None else hf_config
  cfg = config_from_hf(raw, dtype=dtype, where=os.path.join(model_dir, "config.json"), kind=kind,
                       **config_overrides)
  shardings = None
  if mesh is not None:
    from ardiff import sharding as sharding_lib
    from ardiff.model import Transformer
    _, shardings = sharding_lib.abstract_params_and_shardings(Transformer(cfg), mesh,
                                                              rules or sharding_lib.DEFAULT_RULES)
  return cfg, _read_tree(model_dir, cfg, shardings, rename)
