"""The params-directory format: a run's parameters (or EMA) without optimizer state, plus its configs.

Layout written by :func:`save_params_dir` (``python -m ardiff export --to params``, through
:func:`ardiff.export.params.export_params`)::

  OUT/model_config.json   {"format": "safetensors"|"orbax", "model": ModelConfig fields, "use_ema", ...}
  OUT/config.json         the run's full experiment config (tokenizer, objective, data, mesh), when known
  OUT/params.safetensors  flat "/"-joined keys, e.g. "layers/mlp/up_proj/kernel" [L, D, F]   (safetensors)
  OUT/params/             an orbax StandardCheckpointer tree                                   (orbax)
  OUT/tokenizer.*         a copy of the run's tokenizer file (hf:/sentencepiece: runs); config.json names it by
                          a path relative to OUT, resolved by :func:`resolve_tokenizer_path`

``model_config.json`` marks the directory: :func:`ardiff.checkpoints.run_dir.load_run` (and so ``ardiff eval`` and
``ardiff sample``) accepts such a directory wherever it accepts a run directory, and ``train.init_from`` can name
one. :func:`load_params_dir` restores straight into the ``NamedSharding`` of each leaf on a mesh; each device reads
only its own slice of a safetensors tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Optional, Tuple

import jax
import numpy as np
from etils import epath

from ardiff.checkpoints import staging as io_lib
from ardiff.checkpoints import tree_io
from ardiff.checkpoints.paths import as_path, is_url
from ardiff.config import ModelConfig
from ardiff.model import abstract_params

MODEL_CONFIG_FILE = "model_config.json"
RUN_CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "params.safetensors"
ORBAX_DIR = "params"
FORMATS = ("safetensors", "orbax")
# ModelConfig fields that decide the parameter tree and its shapes; the others (dtype, attention_impl, remat,
# mask id, init_std) may differ between the checkpoint and the model that loads it.
WEIGHT_FIELDS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                 "tie_embeddings", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "scan_layers")


def is_params_dir(path) -> bool:
  return (as_path(path) / MODEL_CONFIG_FILE).exists()  # local paths and URLs alike


def check_compatible(source: ModelConfig, target: ModelConfig, where: str) -> None:
  """Raises ValueError naming every weight-layout field in which ``source`` (a checkpoint) differs from ``target``."""
  diffs = [f"{k}: checkpoint {getattr(source, k)!r} vs config {getattr(target, k)!r}" for k in WEIGHT_FIELDS
           if getattr(source, k) != getattr(target, k)]
  if diffs:
    raise ValueError(f"the parameters in {where} do not fit the model config ({'; '.join(diffs)}). Use a config "
                     "whose model section matches the checkpoint (e.g. configs/finetune.py:from=<dir>, which "
                     "reads it from the directory).")


def check_params_match(params: Mapping, cfg: ModelConfig, where: str = "params") -> None:
  """Raises ValueError naming the missing, unexpected and mis-shaped leaves of ``params`` for ``cfg``."""
  want = _flatten(abstract_params(cfg))
  have = _flatten(params)
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  shapes = [f"{k}: {tuple(np.shape(have[k]))} != {want[k].shape}" for k in sorted(set(want) & set(have))
            if tuple(np.shape(have[k])) != tuple(want[k].shape)]
  if missing or extra or shapes:
    raise ValueError(f"{where} do not match the model config: missing {missing[:5]}, unexpected {extra[:5]}, "
                     f"wrong shapes {shapes[:5]}. The checkpoint is incomplete or belongs to another model.")


# ---------------------------------------------------------------------------------------------------- write
def save_params_dir(params, cfg: ModelConfig, out_dir, *, format: str = "safetensors",
                    run_config: Optional[Mapping[str, Any]] = None, tokenizer_file: Optional[str] = None,
                    extra: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> str:
  """Writes ``params`` (plain nested dict of arrays for ``cfg``) as a params directory; returns its path.

  ``run_config``: the experiment config (``ConfigDict.to_dict()`` / the run's ``config.json``) stored as
  ``config.json`` so that ``load_run`` can evaluate and sample from the directory. ``tokenizer_file``: copied
  into the directory and referenced relatively from ``config.json``. Nothing is written when a check fails.
  """
  if format not in FORMATS:
    raise ValueError(f"format={format!r} must be one of {FORMATS}.")
  check_params_match(params, cfg)
  out_dir = io_lib.check_output_dir(out_dir, overwrite=overwrite)
  meta = {"format": format, "model": cfg.to_dict(), **(dict(extra) if extra else {})}
  run_config = json.loads(json.dumps(run_config, default=_jsonable)) if run_config is not None else None
  if tokenizer_file is not None:
    if run_config is None:
      raise ValueError("tokenizer_file needs run_config (the tokenizer spec lives in its data section).")
    if not os.path.isfile(tokenizer_file):
      raise FileNotFoundError(f"tokenizer file {tokenizer_file} not found.")
    kind = run_config["data"]["tokenizer"].partition(":")[0]
    run_config["data"]["tokenizer"] = f"{kind}:{os.path.basename(tokenizer_file)}"  # relative to the directory
  with io_lib.staged_output(out_dir, overwrite=overwrite) as tmp:
    if format == "safetensors":
      from safetensors.numpy import save_file
      flat = {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in _flatten(params).items()}
      save_file(flat, os.path.join(tmp, SAFETENSORS_FILE), metadata={"format": "ardiff"})
    else:
      import orbax.checkpoint as ocp
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp, ORBAX_DIR), params)
        ckptr.wait_until_finished()
    with open(os.path.join(tmp, MODEL_CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2, default=_jsonable)
    if run_config is not None:
      with open(os.path.join(tmp, RUN_CONFIG_FILE), "w") as f:
        json.dump(run_config, f, indent=2)
    if tokenizer_file is not None:
      shutil.copy(tokenizer_file, os.path.join(tmp, os.path.basename(tokenizer_file)))
  return out_dir


def tokenizer_file_of(spec: str) -> Optional[str]:
  """The local file behind an ``hf:`` / ``sentencepiece:`` tokenizer spec; None for the byte tokenizer."""
  kind, _, arg = spec.strip().partition(":")
  if kind.lower() in ("hf", "sentencepiece", "sp", "spm"):
    return os.path.expanduser(arg)
  return None


def resolve_tokenizer_path(config, base_dir: str) -> None:
  """Rewrites a relative tokenizer file in ``config.data.tokenizer`` (a ConfigDict) as a path under ``base_dir``."""
  spec = config.data.tokenizer
  path = tokenizer_file_of(spec)
  if path is not None and not os.path.isabs(path):
    config.data.tokenizer = f"{spec.partition(':')[0]}:{os.path.join(base_dir, path)}"


# ----------------------------------------------------------------------------------------------------- read
def read_meta(path) -> dict:
  path = io_lib.clean_path(path)
  meta_path = epath.Path(path) / MODEL_CONFIG_FILE
  if not meta_path.exists():
    raise FileNotFoundError(f"{meta_path} not found: {path} is not a params directory (write one with "
                            "`python -m ardiff export --to params`).")
  try:
    meta = json.loads(meta_path.read_text())
  except ValueError as e:
    raise ValueError(f"{meta_path} is not valid JSON ({e}); the params directory is damaged.") from None
  if not isinstance(meta, dict) or meta.get("format") not in FORMATS or "model" not in meta:
    fmt = meta.get("format") if isinstance(meta, dict) else None
    raise ValueError(f"{meta_path} is not a params-directory manifest (format={fmt!r}; need one "
                     f"of {FORMATS} and a 'model' section).")
  return meta


def load_params_dir(path, *, mesh=None, rules=None, target: Optional[ModelConfig] = None
                    ) -> Tuple[ModelConfig, dict]:
  """``(ModelConfig, params)`` of a params directory.

  ``target``: the config of the model that will use the parameters (default: the stored one). Its weight layout
  (:data:`WEIGHT_FIELDS`) must match; the arrays are cast to its ``param_dtype``. With ``mesh`` (and ``rules``,
  default :data:`ardiff.sharding.DEFAULT_RULES`) every leaf is created in its ``NamedSharding``.
  """
  path = io_lib.clean_path(path)
  meta = read_meta(path)
  stored = ModelConfig.from_dict(meta["model"])
  cfg = stored if target is None else target
  check_compatible(stored, cfg, path)
  abstract = abstract_params(cfg)
  shardings = None
  if mesh is not None:
    from ardiff import sharding as sharding_lib
    from ardiff.model import Transformer
    _, shardings = sharding_lib.abstract_params_and_shardings(Transformer(cfg), mesh,
                                                              rules or sharding_lib.DEFAULT_RULES)
  if meta["format"] == "safetensors":
    with _local_file(as_path(path) / SAFETENSORS_FILE) as file:
      return cfg, _read_safetensors(file, abstract, shardings)
  import orbax.checkpoint as ocp
  ckpt = as_path(path) / ORBAX_DIR  # orbax reads local paths and gs:// alike
  if not ckpt.is_dir():
    raise FileNotFoundError(f"{ckpt} not found: the params directory {path} is incomplete.")
  if shardings is None:
    target_tree = abstract
  else:
    target_tree = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                               shardings)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      params = ckptr.restore(ckpt, target_tree)
    except (ValueError, KeyError) as e:
      raise ValueError(f"{ckpt} does not hold the parameters of {MODEL_CONFIG_FILE}'s model: {e}") from e
  return cfg, params


@contextlib.contextmanager
def _local_file(path) -> Iterator[str]:
  """A local file name for ``path``: itself, or for a URL a temporary copy (safetensors reads local files only)."""
  if not is_url(path):
    yield os.fspath(path)
    return
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: the params directory is incomplete.")
  tmp = tempfile.mkdtemp(prefix="ardiff-params-")
  try:
    local = os.path.join(tmp, path.name)
    path.copy(epath.Path(local))
    yield local
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _read_safetensors(file: str, abstract, shardings) -> dict:
  from safetensors import SafetensorError
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} not found: the params directory is incomplete.")
  try:
    return _read_safetensors_file(file, abstract, shardings)
  except SafetensorError as e:  # a truncated or overwritten file: its header or data no longer parse
    raise ValueError(f"{file} is damaged ({e}); export the run again (ardiff export --to params) or restore a "
                     "copy of the file.") from e


def _read_safetensors_file(file: str, abstract, shardings) -> dict:
  from safetensors import safe_open
  want = _flatten(abstract)
  sh_flat = _flatten(shardings) if shardings is not None else None
  out = {}
  with safe_open(file, framework="numpy") as f:
    keys = set(f.keys())
    missing, extra = sorted(set(want) - keys), sorted(keys - set(want))
    if missing or extra:
      raise ValueError(f"{file} does not hold the parameters of its model config: missing tensors {missing[:5]}, "
                       f"unexpected {extra[:5]}.")
    for key, spec in want.items():
      sl = f.get_slice(key)
      shape = tuple(sl.get_shape())
      if shape != tuple(spec.shape):
        raise ValueError(f"{file}: tensor {key!r} has shape {shape}, the model config needs {tuple(spec.shape)}.")
      dtype = np.dtype(spec.dtype)
      if sh_flat is None:
        out[key] = jax.numpy.asarray(f.get_tensor(key).astype(dtype))
      else:
        sh = tree_io.fit_sharding(sh_flat[key], shape)
        out[key] = jax.make_array_from_callback(
            shape, sh, lambda idx, sl=sl, shape=shape, dtype=dtype: np.asarray(sl[tree_io.norm_index(idx, shape)]
                                                                                ).astype(dtype))
  return _unflatten(out)


# ---------------------------------------------------------------------------------------------------- trees
_flatten, _unflatten = tree_io.flatten, tree_io.unflatten


def _jsonable(x):
  if isinstance(x, (tuple, set)):
    return list(x)
  if isinstance(x, np.generic):
    return x.item()
  return str(x)
