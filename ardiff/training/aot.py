"""``python -m ardiff compile --config ... --topology v5e:16x16``: compile the sharded train step for a TPU slice
that is not there (real TPU compiler via libtpu, on any CPU machine) and check it fits in each chip's HBM.

So a pod job is known to compile and fit before anyone pays for it. Needs ``pip install "jax[tpu]==0.10.2"``
(libtpu; installs on a CPU-only machine; part of requirements-dev.txt). ``--from_hf MODEL`` compiles an imported
Hugging Face checkpoint's sampler instead (``python -m ardiff compile --from_hf X --help`` lists its flags).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re

import jax
import jax.numpy as jnp

from ardiff import experiment as experiment_lib
from ardiff import objectives, sharding
from ardiff.errors import UsageError
from ardiff.model import Transformer
from ardiff.training import clip_search as clip_search_lib
from ardiff.training import optimizer as optimizer_lib
from ardiff.training import tpu_cost
from ardiff.training import train_state as train_state_lib

GIB = 1024 ** 3
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}


class DoesNotFitError(RuntimeError):
  pass


# Slice shapes per generation: v5e/v6e slices are 2-D (AxB), v4/v5p 3-D (AxBxC); the limits are the largest pods.
TOPOLOGY_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
MAX_DIM = {"v4": 16, "v5p": 28, "v5e": 16, "v6e": 16}
MAX_CHIPS = {"v4": 4096, "v5p": 8960, "v5e": 256, "v6e": 256}
EXAMPLE_TOPOLOGIES = "v5e:2x2, v6e:16x16, v5p:8x8x8 or v4:4x4x4"


def parse_topology(topology: str) -> tuple:
  """``"v5p:8x8x8"`` -> ``("v5p", (8, 8, 8))``; raises UsageError on a malformed or impossible name.

  Checked before any jax/libtpu work: libtpu accepts some impossible shapes (``v5p:8x8x88``) and only fails later.
  """
  text = topology if isinstance(topology, str) else repr(topology)
  m = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+)*)", text.strip())
  if not m:
    hint = f" (did you mean {text.strip().lower()!r}?)" if re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+)*)",
                                                                        text.strip().lower()) else ""
    raise UsageError(f"malformed TPU topology {text!r}{hint}: use GENERATION:AxB (v5e, v6e) or GENERATION:AxBxC "
                     f"(v4, v5p) in lower case, e.g. {EXAMPLE_TOPOLOGIES}.")
  generation, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
  if generation not in TOPOLOGY_DIMS:
    raise UsageError(f"unknown TPU generation {generation!r} in topology {text!r}; known: "
                     f"{', '.join(sorted(TOPOLOGY_DIMS))} (e.g. {EXAMPLE_TOPOLOGIES}).")
  want = TOPOLOGY_DIMS[generation]
  if len(dims) != want:
    shape = "AxB" if want == 2 else "AxBxC"
    raise UsageError(f"TPU topology {text!r}: {generation} slices have {want} dimensions ({generation}:{shape}), "
                     f"got {len(dims)}.")
  chips = 1
  for d in dims:
    chips *= d
  if min(dims) < 1 or max(dims) > MAX_DIM[generation] or chips > MAX_CHIPS[generation]:
    raise UsageError(f"TPU topology {text!r} is not a {generation} slice: each dimension must lie in "
                     f"[1, {MAX_DIM[generation]}] and a slice has at most {MAX_CHIPS[generation]} chips "
                     f"(got {chips}).")
  return generation, dims


def _libtpu_installed() -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: str):
  """The devices of a TPU slice described by name, e.g. ``v5e:2x2``, ``v5p:8x8x8``."""
  parse_topology(topology)
  if not _libtpu_installed():
    raise UsageError(f"cannot describe TPU topology {topology!r}: the TPU compiler (libtpu) is not installed. "
                     "Install it with `pip install \"jax[tpu]==0.10.2\"` (it installs on CPU-only machines too).")
  # We only compile, never run: let several processes (test workers, a second compile) load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  except Exception as e:  # noqa: BLE001 - libtpu rejects a shape it cannot lay out (e.g. v5e:3x3)
    message = " ".join(str(e).split())
    raise UsageError(f"cannot describe TPU topology {topology!r}: the TPU compiler rejected it ({type(e).__name__}: "
                     f"{message}). Use a slice shape such as {EXAMPLE_TOPOLOGIES}.") from e


# The XLA fusions' estimate (while bodies x trip count); Mosaic kernels count 0 there (see compile_train_step).
xla_estimated_cycles = tpu_cost.xla_estimated_cycles

# Set (to a directory) in the process that ``main`` starts with libtpu's bundle dump on (see ``_kernel_estimate``).
DUMP_DIR_ENV = "ARDIFF_TPU_BUNDLE_DUMP"


def hbm_per_chip(topology: str) -> int:
  return HBM_BYTES[parse_topology(topology)[0]]


@contextlib.contextmanager
def _tpu_kernels(config, topology: str):
  """With attention_impl='pallas' or 'auto' (which a TPU host resolves to the kernels), trace the TPU (Mosaic)
  kernels: this host is a CPU, the compile targets TPU. The kernel tiles are chosen for the topology's generation
  (named here, not read back from the compile devices)."""
  if config.model.attention_impl not in ("pallas", "auto"):
    yield
    return
  from ardiff import attention as attention_lib
  with attention_lib.target_backend("tpu", generation=parse_topology(topology)[0]):
    yield


def compile_train_step(config, topology: str, *, kernel_dump: str | None = None) -> dict:
  """AOT-compiles the sharded train step; returns per-chip memory figures and the static cost estimate. Raises
  DoesNotFitError.

  ``xla_cycles``: the XLA fusions' ``estimated_cycles`` (while bodies x trip count). ``kernels``: the Mosaic
  kernels' bundle estimate (:func:`ardiff.training.tpu_cost.kernel_bundles`), read from ``kernel_dump``, the
  directory libtpu was told to dump bundles into (``tpu_cost.dump_flags``, set before libtpu loaded); None when
  the step has Mosaic kernels and no dump was given (not estimated), ``total`` 0 when it has none.
  ``step_estimate`` = the two summed, or None when the kernels were not estimated."""
  with _tpu_kernels(config, topology):
    return _compile_train_step(config, topology, kernel_dump)


def _module_text(compiled) -> str:
  """The compiled module's text with large constants printed (the block-sparse kernels' tile-kind tables)."""
  try:
    from jaxlib import _hlo
    options = _hlo.HloPrintOptions()
    options.print_large_constants = True
    return compiled.runtime_executable().hlo_modules()[0].to_string(options)
  except (ImportError, AttributeError, IndexError):  # another jaxlib: tables elided, kernels become upper bounds
    return compiled.as_text()


def _compile_train_step(config, topology: str, kernel_dump: str | None) -> dict:
  devices = tpu_devices(topology)
  exp = experiment_lib.validate(config, devices=devices)
  model_cfg = exp.model
  notes = []
  if model_cfg.attention_impl == "pallas":
    # The compile runs on this (CPU) host but targets TPU devices: the Mosaic kernels are compiled (not
    # interpreted) because compile_train_step runs inside attention.target_backend("tpu"); under the mesh
    # ardiff.attention wraps them in shard_map with specs from the config's logical axis rules.
    notes.append("attention_impl='pallas' compiled with the TPU (Mosaic) kernels under shard_map.")
  if model_cfg.attention_impl == "auto":
    # 'auto' resolves by the *running* backend (CPU here): compile what the TPU host will run, and say so.
    model_cfg = dataclasses.replace(model_cfg, attention_impl="pallas")
    notes.append("attention_impl='auto' compiled with the TPU (Mosaic) kernels under shard_map, as a TPU host "
                 "resolves it.")
  mesh = sharding.make_mesh(exp, devices=devices)
  model = Transformer(model_cfg)
  tx, lr_schedule = optimizer_lib.make_optimizer(exp.optimizer)
  ema = exp.optimizer.ema_decay > 0
  abstract_params, param_sh = sharding.abstract_params_and_shardings(model, mesh, exp.rules)
  abstract_state = jax.eval_shape(
      lambda p: train_state_lib.TrainState.create(p, tx, jax.random.key(0), use_ema=ema,
                                                  clip=clip_search_lib.initial_clip(exp.objective)),
      abstract_params)
  state_sh = train_state_lib.state_shardings(abstract_state, param_sh, mesh)
  step = train_state_lib.make_train_step(objectives.make_loss_fn(model, exp.objective), tx,
                                         ema_decay=exp.optimizer.ema_decay if ema else None,
                                         lr_schedule=lr_schedule)
  batch_sh = sharding.batch_sharding(mesh)
  micro = exp.train.batch_size // exp.optimizer.grad_accum_steps
  batch = {k: jax.ShapeDtypeStruct((micro, exp.data.seq_len), jnp.int32, sharding=batch_sh)
           for k in ("tokens", "segment_ids", "positions", "loss_mask")}
  with sharding.activation_sharding(mesh, exp.rules):
    lowered = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                      donate_argnums=0).lower(sharding.with_shardings(abstract_state, state_sh), batch)
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001
    if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
      raise DoesNotFitError(f"{exp.name} does not fit on {topology}: the TPU compiler ran out of memory "
                            f"({str(e)[:400]}). Shard more (mesh.fsdp/tensor), lower train.batch_size, raise "
                            "optimizer.grad_accum_steps, or enable model.remat_policy.") from e
    raise
  mem = compiled.memory_analysis()
  used = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
  hbm = hbm_per_chip(topology)
  result = {"topology": topology, "chips": len(devices), "mesh": dict(mesh.shape),
            "params": model_cfg.num_params(), "arguments_gib": mem.argument_size_in_bytes / GIB,
            "temp_gib": mem.temp_size_in_bytes / GIB, "per_chip_gib": used / GIB, "hbm_gib": hbm / GIB,
            "fits": used <= hbm, "notes": notes}
  text = _module_text(compiled)
  result["xla_cycles"] = xla_estimated_cycles(text)
  if 'custom_call_target="tpu_custom_call"' not in text:
    result["kernels"] = {"total": 0, "kernels": {}, "missing": []}
  elif kernel_dump is not None:
    result["kernels"] = tpu_cost.kernel_bundles(text, kernel_dump)
  else:
    result["kernels"] = None
  result["step_estimate"] = None if result["kernels"] is None else result["xla_cycles"] + result["kernels"]["total"]
  if used > hbm:
    raise DoesNotFitError(f"{exp.name} needs {used / GIB:.2f} GiB per chip on {topology} but a chip has "
                          f"{hbm / GIB:.0f} GiB HBM. Shard more (mesh.fsdp/tensor), lower train.batch_size, raise "
                          "optimizer.grad_accum_steps, or enable model.remat_policy.")
  return result


def compile_sampler_steps(config, topology: str, *, max_len: int | None = None) -> dict:
  """AOT-compiles the sampler's per-step forwards against a sharded KV cache: the AR step (1 token) and the
  block-diffusion denoise step (B tokens, cache read-only). Returns ``{name: per-chip GiB}``."""
  with _tpu_kernels(config, topology):
    return _compile_sampler_steps(config, topology, max_len=max_len)


def _compile_sampler_steps(config, topology: str, *, max_len: int | None = None) -> dict:
  from jax.sharding import NamedSharding, PartitionSpec as P

  from ardiff import masks
  from ardiff.model import KVCache

  devices = tpu_devices(topology)
  exp = experiment_lib.validate(config, devices=devices)
  model_cfg = exp.model if exp.model.attention_impl != "auto" else dataclasses.replace(exp.model,
                                                                                      attention_impl="pallas")
  mesh = sharding.make_mesh(exp, devices=devices)
  model = Transformer(model_cfg)
  abstract_params, param_sh = sharding.abstract_params_and_shardings(model, mesh, exp.rules)
  batch = mesh.shape["data"] * mesh.shape["fsdp"]
  max_len = max_len or 2 * exp.data.seq_len
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  kv = NamedSharding(mesh, P(None, ("data", "fsdp"), None, "tensor", None))
  cache_sh = KVCache(k=kv, v=kv, lengths=rows)
  abstract_cache = jax.eval_shape(lambda: KVCache.init(model_cfg, batch, max_len))
  hbm, out = hbm_per_chip(topology), {}
  steps = {"ar_step": (1, masks.Causal())}
  if exp.objective.kind == "block_diffusion":
    steps["denoise_step"] = (exp.objective.block_size, masks.BlockCausal(exp.objective.block_size))
  for name, (t, mask) in steps.items():
    def step(params, tokens, cache, mask=mask):
      o = model.apply({"params": params}, tokens, mask=mask, cache=cache)
      return o.logits, o.cache
    tokens = jax.ShapeDtypeStruct((batch, t), jnp.int32, sharding=rows)
    with sharding.activation_sharding(mesh, exp.rules):
      compiled = jax.jit(step, in_shardings=(param_sh, rows, cache_sh), out_shardings=(None, cache_sh),
                         donate_argnums=2).lower(sharding.with_shardings(abstract_params, param_sh), tokens,
                                                 sharding.with_shardings(abstract_cache, cache_sh)).compile()
    mem = compiled.memory_analysis()
    used = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    if used > hbm:
      raise DoesNotFitError(f"{name} needs {used / GIB:.2f} GiB per chip on {topology} (HBM {hbm / GIB:.0f} GiB); "
                            "shard more or lower the cache length.")
    out[name] = used / GIB
  return out


def _checked_topology(text: str) -> str:
  parse_topology(text)  # a bad name fails while parsing the flags, not after a long compile
  return text


def main(argv) -> int:
  """``python -m ardiff compile [--config FILE] [--config.SECTION.KEY=VALUE ...] --topology v5e:2x2``."""
  from ardiff import cli_flags
  from ardiff.training.main import DEFAULT_CONFIG

  parsed = cli_flags.parse(argv, description=__doc__, default_config=DEFAULT_CONFIG, flags=(
      cli_flags.Flag("topology", "v5e:2x2", f"TPU slice, e.g. {EXAMPLE_TOPOLOGIES}", _checked_topology),
      cli_flags.Flag("kernel_estimate", True, "with Mosaic kernels (attention_impl pallas/auto), rerun in a child "
                     "process with libtpu's bundle dump on to count their bundles", cli_flags.parse_bool)))
  if parsed is None:  # --help
    return 0
  config, flag_values = parsed
  topology = flag_values["topology"]
  experiment_lib.validate(config)
  dump = os.environ.get(DUMP_DIR_ENV)
  if flag_values["kernel_estimate"] and dump is None and config.model.attention_impl in ("pallas", "auto"):
    return _rerun_with_bundle_dump(argv)
  try:
    r = compile_train_step(config, topology, kernel_dump=dump)
  except DoesNotFitError as e:
    print(f"DOES NOT FIT: {e}")
    return 1
  print(f"{r['topology']}: {r['chips']} chips, mesh {r['mesh']}, {r['params'] / 1e6:.1f}M params")
  print(f"per chip: {r['per_chip_gib']:.2f} GiB of {r['hbm_gib']:.0f} GiB HBM "
        f"(arguments {r['arguments_gib']:.2f} GiB, temporaries {r['temp_gib']:.2f} GiB) -> fits")
  _print_estimate(r)
  for note in r["notes"]:
    print("note:", note)
  try:
    for name, gib in compile_sampler_steps(config, topology).items():
      print(f"{name}: {gib:.2f} GiB per chip with a sharded KV cache -> fits")
  except DoesNotFitError as e:
    print(f"DOES NOT FIT: {e}")
    return 1
  return 0


def _rerun_with_bundle_dump(argv) -> int:
  """libtpu reads its flags once, when it loads: the bundle dump needs a process that sets them first. Runs this
  same command in a child with the dump on (into a temporary directory, removed afterwards); returns its status."""
  import shutil
  import subprocess
  import sys
  import tempfile
  directory = tempfile.mkdtemp(prefix="ardiff_tpu_bundles_")
  env = dict(os.environ, **{DUMP_DIR_ENV: directory,
                            "LIBTPU_INIT_ARGS": tpu_cost.dump_flags(directory, os.environ.get("LIBTPU_INIT_ARGS", ""))})
  try:
    return subprocess.run([sys.executable, "-m", "ardiff", "compile", *argv[1:]], env=env).returncode
  finally:  # the dump holds every program of the compile (tens to hundreds of MB)
    shutil.rmtree(directory, ignore_errors=True)


def _print_estimate(r: dict) -> None:
  print(f"static estimate per chip: XLA fusions {r['xla_cycles'] / 1e6:.2f} M cycles (the compiler's "
        "estimated_cycles, while bodies x trip count)")
  k = r["kernels"]
  if k is None:
    print("  Pallas kernels: NOT ESTIMATED (their bundles need libtpu's dump, which --nokernel_estimate turned off); "
          "whole step: not estimated")
    return
  for name, fig in sorted(k["kernels"].items()):
    bound = "" if fig["exact"] else " (upper bound: every grid step counted with its whole loop body)"
    if not fig["calls"]:
      bound = " (its computation is not reached through while loops and calls from the entry: NOT COUNTED)"
    print(f"  kernel {name}: {fig['estimate'] / 1e6:.3f} M bundles x {fig['calls']} calls per step{bound}")
  for name in k["missing"]:
    print(f"  kernel {name}: no bundle dump found, NOT COUNTED")
  uncounted = len(k["missing"]) + sum(1 for fig in k["kernels"].values() if not fig["calls"])
  partial = f" (incomplete: {uncounted} kernels not counted)" if uncounted else ""
  if k["kernels"] or k["missing"]:
    print(f"  Pallas kernels: {k['total'] / 1e6:.2f} M bundles (per-tile loop bodies x tiles and grid steps visited)")
  else:
    print("  Pallas kernels: none in this step (attention_impl='xla')")
  print(f"whole step: {r['step_estimate'] / 1e6:.2f} M cycles per chip = XLA fusions + kernels{partial} "
        "(a static proxy, not a time: compare configs by it)")
