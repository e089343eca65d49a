"""Serving export: the samplers' step functions as serialized StableHLO (``jax.export``), loadable without ardiff.

:func:`export_serving` writes one ``<name>.stablehlo`` file (``Exported.serialize()`` bytes) per step function and a
``serving.json`` manifest; :func:`load_serving` reads them back (``jax.export.deserialize``) after checking the
manifest's format version and each file's size and sha256. The step functions are pure, with explicit inputs:

* **params are an input**, not baked-in constants, so one artifact serves every checkpoint of the architecture. The
  argument is the plain nested dict of ``init_params`` / ``load_run`` (scanned layers: ``layers/...`` leaves carry a
  leading ``[num_layers]`` axis); its leaf shapes and dtypes are in the manifest and :func:`check_params` names the
  first leaf that differs (``Exported.call`` would only report a flattened argument index).
* **the KV cache is an input and an output**: ``cache_k``/``cache_v`` ``[layers, b, max_len, kv_heads, head_dim]``
  (compute dtype) and ``cache_lengths [b]`` int32 = committed (clean) entries per row. A step writes its tokens' K/V
  at each row's ``cache_lengths`` (ragged rows are exact); the caller must keep ``cache_lengths + n <= max_len``
  (``dynamic_update_slice`` clamps out-of-range starts instead of failing).

Step functions (``V`` vocab, ``P`` = ``prompt_len``, ``B`` = ``block_size``; all token inputs int32):

* ``prefill(params, tokens [b, P] right-padded, lengths [b] >= 1) -> (last_logits [b, V], cache_k, cache_v,
  cache_lengths = lengths)``: ``last_logits`` are the logits at each row's ``lengths - 1``.
* ``ar_step(params, token [b], cache_k, cache_v, cache_lengths) -> (logits [b, V], cache_k, cache_v, lengths + 1)``.
* ``denoise_step(params, block_tokens [b, B], cache_k, cache_v, cache_lengths) -> logits [b, B, V]``: read-only (the
  block's K/V is written into a copy that is dropped), so the cache is not returned.
* ``write_block(params, block_tokens [b, B], cache_k, cache_v, cache_lengths) -> (logits [b, B, V], cache_k, cache_v,
  lengths + B)``: commits a clean block.

AR exports (``block_size=None``) hold ``prefill`` (Causal mask) and ``ar_step``. Block-diffusion exports hold all
four; their ``prefill`` uses ``BlockCausal(B)`` like the block sampler, so prompt ``lengths`` must be positive
multiples of B (the graph cannot check it and would give inexact logits; :meth:`Serving.call` checks concrete lengths)
and ``last_logits`` there is the clean-token logit at ``lengths - 1``, which the block sampler ignores. ``ar_step``
attends causally for any mask (a single query never sees keys past itself), but after it the lengths are no longer
block-aligned.

Batch is the symbolic dimension ``b`` (``jax.export.symbolic_shape``); ``P``, ``B`` and ``max_len`` are static. A
function whose symbolic export fails is re-exported with the static ``batch`` and a warning, and its manifest entry
records ``"batch": <int>`` and ``"symbolic_batch_error"`` (with jax 0.10.2 all four export with a symbolic batch).
Attention is always the dense XLA path: the Pallas kernels
are platform specific (Mosaic custom calls exist for TPU only), while the dense graph lowers for every platform in
``platforms``, on a machine without those devices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ardiff import masks as masks_lib
from ardiff.checkpoints import paths
from ardiff.config import ModelConfig
from ardiff.model import KVCache, Transformer, abstract_params
from ardiff.sampling import ar as ar_lib

log = logging.getLogger(__name__)

FORMAT = "ardiff-stablehlo-serving"
FORMAT_VERSION = 1
MANIFEST_FILE = "serving.json"
SUFFIX = ".stablehlo"
CACHE_NAMES = ("cache_k", "cache_v", "cache_lengths")
_IO = {  # input names after params, output names
    "prefill": (("tokens", "lengths"), ("last_logits",) + CACHE_NAMES),
    "ar_step": (("token",) + CACHE_NAMES, ("logits",) + CACHE_NAMES),
    "denoise_step": (("block_tokens",) + CACHE_NAMES, ("logits",)),
    "write_block": (("block_tokens",) + CACHE_NAMES, ("logits",) + CACHE_NAMES),
}


def step_functions(cfg: ModelConfig, *, max_len: int, block_size: Optional[int]) -> Dict[str, Callable]:
  """The pure step functions ``name -> f(params, ...)`` (see the module docstring) of one architecture."""
  model = Transformer(cfg.replace(attention_impl="xla"))
  causal = masks_lib.Causal()
  prefill_mask = causal if block_size is None else masks_lib.BlockCausal(block_size)

  def prefill(params, tokens, lengths):
    cache, last = ar_lib.prefill(params, model, tokens, lengths, max_len, prefill_mask)
    return last, cache.k, cache.v, cache.lengths

  def forward(params, tokens, k, v, lengths, mask):
    return model.apply({"params": params}, tokens, mask=mask, cache=KVCache(k=k, v=v, lengths=lengths))

  def ar_step(params, token, k, v, lengths):
    out = forward(params, token[:, None], k, v, lengths, causal)
    cache = out.cache.advance(1)
    return out.logits[:, 0], cache.k, cache.v, cache.lengths

  fns = {"prefill": prefill, "ar_step": ar_step}
  if block_size is not None:
    block_mask = masks_lib.BlockCausal(block_size)

    def denoise_step(params, block_tokens, k, v, lengths):
      return forward(params, block_tokens, k, v, lengths, block_mask).logits  # read-only: the cache is dropped

    def write_block(params, block_tokens, k, v, lengths):
      out = forward(params, block_tokens, k, v, lengths, block_mask)
      cache = out.cache.advance(block_size)
      return out.logits, cache.k, cache.v, cache.lengths

    fns.update(denoise_step=denoise_step, write_block=write_block)
  return fns


def _leaves(params) -> Dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def _plain(tree):
  """Nested Mappings (e.g. a FrozenDict) -> plain dicts: the exported function's params pytree is a dict tree."""
  return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def params_spec(params) -> Dict[str, dict]:
  return {path: {"shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name} for path, x in _leaves(params).items()}


def check_params(params, manifest: Mapping) -> None:
  """Raises ValueError naming the first leaf (``/``-joined path) missing, extra, or of another shape/dtype."""
  if not isinstance(params, Mapping):
    raise ValueError(f"params must be the nested dict of parameters, got {type(params).__name__}.")
  expected, given = manifest["params"], _leaves(params)
  where = f"the serving export's architecture ({manifest['model']})"
  for path, spec in expected.items():
    if path not in given:
      raise ValueError(f"params leaf {path!r} is missing; expected {spec['shape']} {spec['dtype']} for {where}.")
    x = given[path]
    got = {"shape": list(getattr(x, "shape", ())), "dtype": jnp.dtype(getattr(x, "dtype", type(x))).name}
    if got != spec:
      raise ValueError(f"params leaf {path!r} is {got['shape']} {got['dtype']} but the export expects "
                       f"{spec['shape']} {spec['dtype']}: these params belong to another architecture than {where}.")
  extra = sorted(set(given) - set(expected))
  if extra:
    raise ValueError(f"params has leaf {extra[0]!r} that the export does not expect (architecture: {where}).")


def _dims(shape) -> list:
  return [d if isinstance(d, int) else str(d) for d in shape]


def _export_one(fn, specs_for: Callable[[Any], tuple], params_abs, platforms, batch: int, symbolic: bool):
  """``(Exported, symbolic_batch_error or None)``; falls back to the static ``batch`` (with a warning)."""
  if symbolic:
    (b,) = jax.export.symbolic_shape("b")  # one symbol shared by every input of this function
    try:
      return jax.export.export(jax.jit(fn), platforms=platforms)(params_abs, *specs_for(b)), None
    except Exception as e:  # noqa: BLE001  (any tracing/lowering failure: retry static, and say so)
      log.warning("serving export of %s with a symbolic batch failed (%s: %s); exporting with static batch=%d.",
                  fn.__name__, type(e).__name__, e, batch)
      err = f"{type(e).__name__}: {e}"
  else:
    err = None
  return jax.export.export(jax.jit(fn), platforms=platforms)(params_abs, *specs_for(batch)), err


def export_serving(params, cfg: ModelConfig, out_dir: str, *, max_len: int, prompt_len: int,
                   block_size: Optional[int], symbolic_batch: bool = True, batch: int = 1,
                   platforms: Sequence[str] = ("cpu",), functions: Optional[Sequence[str]] = None) -> str:
  """Writes ``<name>.stablehlo`` per step function and ``serving.json`` into ``out_dir``; returns ``out_dir``.

  ``params`` (or None) only fixes and checks the parameter shapes/dtypes; its values are not stored. ``max_len``:
  cache slots; ``prompt_len``: the padded prompt width P of ``prefill``; ``block_size``: B of a block-diffusion
  model, None for AR (see the module docstring). ``batch`` is the static batch used when ``symbolic_batch`` is False
  or a symbolic export fails. ``platforms``: lowering targets, e.g. ``("cpu", "cuda", "tpu")``; the artifact runs on
  any of them. ``functions``: a subset of the names to export (default all for this kind of model).
  """
  out_dir = _local_dir(out_dir, "`ardiff export --to stablehlo --out URL` stages the export locally and uploads it")
  if not 1 <= prompt_len <= max_len:
    raise ValueError(f"need 1 <= prompt_len ({prompt_len}) <= max_len ({max_len}).")
  if block_size is not None and (block_size < 1 or cfg.mask_token_id is None):
    raise ValueError(f"block diffusion export needs block_size >= 1 (got {block_size}) and cfg.mask_token_id.")
  fns = step_functions(cfg, max_len=max_len, block_size=block_size)
  names = list(fns) if functions is None else list(functions)
  unknown = [n for n in names if n not in fns]
  if unknown:
    raise ValueError(f"functions {unknown} are not exported for block_size={block_size}; choose from {list(fns)}.")
  params_abs = abstract_params(cfg)
  manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "jax_version": jax.__version__,
              "platforms": list(platforms), "model": cfg.replace(attention_impl="xla").to_dict(),
              "block_size": block_size, "max_len": int(max_len), "prompt_len": int(prompt_len),
              "mask_token_id": cfg.mask_token_id, "params": params_spec(params_abs), "functions": {}}
  if params is not None:
    check_params(params, manifest)

  cache_shape = lambda b: (cfg.num_layers, b, max_len, cfg.num_kv_heads, cfg.head_dim)
  sds = jax.ShapeDtypeStruct
  cache = lambda b: (sds(cache_shape(b), cfg.compute_dtype), sds(cache_shape(b), cfg.compute_dtype),
                     sds((b,), jnp.int32))
  specs = {"prefill": lambda b: (sds((b, prompt_len), jnp.int32), sds((b,), jnp.int32)),
           "ar_step": lambda b: (sds((b,), jnp.int32),) + cache(b),
           "denoise_step": lambda b: (sds((b, block_size), jnp.int32),) + cache(b)}
  specs["write_block"] = specs["denoise_step"]
  os.makedirs(out_dir, exist_ok=True)
  for name in names:
    exp, err = _export_one(fns[name], specs[name], params_abs, tuple(platforms), batch, symbolic_batch)
    data = bytes(exp.serialize())
    with open(os.path.join(out_dir, name + SUFFIX), "wb") as f:
      f.write(data)
    in_names, out_names = _IO[name]
    n_params = len(jax.tree.leaves(params_abs))
    entry = {"file": name + SUFFIX, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
             "batch": "b" if symbolic_batch and err is None else int(batch),
             "inputs": [{"name": "params", "tree": "see 'params'"}] + [
                 {"name": n, "shape": _dims(a.shape), "dtype": a.dtype.name}
                 for n, a in zip(in_names, exp.in_avals[n_params:])],
             "outputs": [{"name": n, "shape": _dims(a.shape), "dtype": a.dtype.name}
                         for n, a in zip(out_names, exp.out_avals)],
             "calling_convention_version": exp.calling_convention_version}
    if err is not None:
      entry["symbolic_batch_error"] = err
    manifest["functions"][name] = entry
  with open(os.path.join(out_dir, MANIFEST_FILE), "w") as f:
    json.dump(manifest, f, indent=2)
  return out_dir


class Serving(NamedTuple):
  """What :func:`load_serving` returns; unpacks as ``exported, manifest = load_serving(d)``."""

  exported: Dict[str, "jax.export.Exported"]
  manifest: dict

  def call(self, name: str, params, *args):
    """``exported[name].call(params, *args)`` after :func:`check_params` (a clear error for a wrong tree).

    A block-diffusion ``prefill`` also checks concrete ``lengths`` here: the graph cannot, and lengths that are not
    multiples of B would give inexact logits silently.
    """
    if name not in self.exported:
      raise KeyError(f"no step function {name!r} in this export; it has {sorted(self.exported)}.")
    check_params(params, self.manifest)
    bs = self.manifest.get("block_size")
    if name == "prefill" and bs and len(args) == 2 and not isinstance(args[1], jax.core.Tracer):
      lengths = np.asarray(args[1])
      if np.any(lengths < 1) or np.any(lengths % bs):
        raise ValueError(f"block-diffusion prefill needs prompt lengths that are positive multiples of the block "
                         f"size {bs}, got {lengths.tolist()}: prefill the whole blocks and put the partial last "
                         f"block's tokens into the first denoise block (as ardiff.sampling.sample_block_diffusion "
                         f"does).")
    return self.exported[name].call(_plain(params), *args)


def _local_dir(path, fix: str) -> str:
  """``path`` expanded and made absolute; a URL is refused with ``fix`` (the artifacts use plain file I/O, and
  ``abspath`` would turn ``gs://b/x`` into a local ``./gs:/b/x``)."""
  if paths.is_url(path):
    raise ValueError(f"{path} is a URL; StableHLO serving exports are written and read in local directories: {fix}.")
  return paths.clean_path(path)


def load_serving(out_dir: str, params=None) -> Serving:
  """Reads a directory written by :func:`export_serving`; with ``params`` also checks them (:func:`check_params`).

  Raises FileNotFoundError for a missing manifest or artifact and ValueError for a manifest of another format or
  version, or an artifact whose size/sha256 differs from the manifest (truncated/corrupt) or that fails to
  deserialize; each message names the file and the fix (re-run :func:`export_serving`).
  """
  out_dir = _local_dir(out_dir, "copy the export to a local directory first")
  fix = "re-run ardiff.export.stablehlo.export_serving into this directory"
  path = os.path.join(out_dir, MANIFEST_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {out_dir} is not a serving export ({fix}).")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); {fix}.") from e
  if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format {manifest.get('format')!r} format_version "
                     f"{manifest.get('format_version')!r}; this ardiff reads {FORMAT!r} format_version "
                     f"{FORMAT_VERSION}: {fix} with this ardiff version.")
  exported = {}
  for name, entry in manifest["functions"].items():
    fpath = os.path.join(out_dir, entry["file"])
    if not os.path.exists(fpath):
      raise FileNotFoundError(f"{fpath} (step function {name!r}) listed in {MANIFEST_FILE} is missing; {fix}.")
    with open(fpath, "rb") as f:
      data = f.read()
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
      raise ValueError(f"{fpath} is corrupt or truncated ({len(data)} bytes, manifest says {entry['bytes']} and a "
                       f"different sha256); {fix}.")
    try:
      exported[name] = jax.export.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001  (flatbuffer/MLIR errors are opaque: name the file)
      raise ValueError(f"{fpath} could not be deserialized ({type(e).__name__}: {e}); it may come from another "
                       f"jax version (written by jax {manifest.get('jax_version')}, this is {jax.__version__}); "
                       f"{fix}.") from e
  if params is not None:
    check_params(params, manifest)
  return Serving(exported, manifest)


def serving_export_from_run(run_dir: str, out_dir: str, *, use_ema: bool = False, **kw) -> str:
  """:func:`export_serving` for the latest checkpoint of a training run (``ardiff.checkpoints.run_dir.load_run``).

  ``block_size`` defaults to ``objective.block_size`` for a ``block_diffusion`` objective and None (AR) otherwise;
  ``max_len`` and ``prompt_len`` are required keyword arguments; the rest of ``kw`` goes to :func:`export_serving`.
  """
  from ardiff.checkpoints.run_dir import load_run
  exp, _, params = load_run(run_dir, use_ema=use_ema)
  if "block_size" not in kw:
    kw["block_size"] = exp.objective.block_size if exp.objective.kind == "block_diffusion" else None
  return export_serving(params, exp.model, out_dir, **kw)
