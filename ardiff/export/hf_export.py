"""ardiff parameters -> a ``transformers``-loadable Hugging Face directory (safetensors, no torch).

``export_hf(params, cfg, out_dir)`` writes ``config.json`` (``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or
``Qwen3ForCausalLM``: :func:`ardiff.export.hf_config.hf_kind`) plus ``model.safetensors`` that ``transformers`` loads with ``from_pretrained``. Extra, ardiff
specific keys (block size, [MASK] id, decoding defaults) go under ``config["ardiff"]`` via ``extra_config``.
Layouts: :mod:`ardiff.export.hf_layout`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Iterable, Mapping, Optional

import jax
import numpy as np

from ardiff.config import ModelConfig
from ardiff.export.hf_config import config_to_hf
from ardiff.export.hf_layout import _LAYER, _LM_HEAD, _TOP_SPECS, _get, _layer_specs

DEFAULT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                           "vocab.json", "merges.txt", "generation_config.json")


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
