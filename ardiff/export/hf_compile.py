"""``python -m ardiff compile --from_hf MODEL --topology v6e:2x4``: will an imported checkpoint sample on a TPU slice?

Reads only the model's ``config.json`` (a directory, an ``ORG/NAME`` in the local Hugging Face cache, or the file
itself; no weights), builds the run config ``ardiff convert`` would write (a diffusion family's block size and
[MASK] id, or an AR model with its own vocabulary), with bf16 parameters sharded FSDP over the slice, and
AOT-compiles the sampler's steps (:func:`ardiff.training.aot.compile_sampler_steps`: the 1-token AR step and the
B-token denoise step against a sharded KV cache) for a TPU slice that is not there; prints each step's per-chip
memory. Training an 8B model needs more chips (optimizer state); this answers the sampling question only.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import ml_collections

from ardiff.errors import UsageError


def _read_config(model: str):
  """``(config.json dict, its path)``."""
  if os.path.isfile(model):
    path = os.path.abspath(model)
  else:
    from ardiff.export import hf_cache
    path = os.path.join(hf_cache.resolve_model_dir(model), "config.json")
    if not os.path.isfile(path):
      raise UsageError(f"{path} not found: {model} is not a Hugging Face model directory.")
  with open(path) as f:
    return json.load(f), path


def experiment_for_hf(model: str, *, seq_len: Optional[int] = None, dtype: str = "bfloat16",
                      fsdp: int = -1) -> ml_collections.ConfigDict:
  """The experiment config of an imported ``model`` (see the module docstring), weights not needed."""
  from ardiff import experiment as experiment_lib
  from ardiff.export import families
  from ardiff.export.hf_config import config_from_hf
  raw, path = _read_config(model)
  fam = families.detect(raw, model)
  hf = families.base_config(fam, raw, model) if fam else raw
  cfg = config_from_hf(hf, dtype=dtype, kind=fam.base if fam else None, scan_layers=True)
  c = experiment_lib.base_config()
  with c.unlocked():
    c.name = f"{fam.name if fam else 'ar'}:{os.path.basename(os.path.dirname(path))}"
    # the model's own tokenizer (not opened when absent: a compile needs none)
    c.data.tokenizer = "hf:" + os.path.join(os.path.dirname(path), "tokenizer.json")
    if fam is not None:
      ctx = seq_len or min(fam.default_seq_len, int(hf.get("max_position_embeddings") or fam.default_seq_len))
      block = families.block_size(fam, raw, ctx)
      c.model = ml_collections.ConfigDict(cfg.replace(
          mask_token_id=families.mask_id(fam, raw, cfg.vocab_size, model_dir=os.path.dirname(path))).to_dict())
      c.objective.update(families.objective_fields(fam, block))
      c.data.seq_len = ctx if fam.bidirectional else max(block, ctx // block * block)
    else:
      c.model = ml_collections.ConfigDict(cfg.replace(mask_token_id=None).to_dict())
      c.objective.kind = "ar"
      c.data.seq_len = seq_len or min(4096, int(hf.get("max_position_embeddings") or 4096))
    c.mesh.update(data=1, fsdp=fsdp, tensor=1)
    c.train.batch_size = 8
  return c


def compile_hf_sampler(model: str, topology: str, *, seq_len: Optional[int] = None,
                       max_len: Optional[int] = None) -> dict:
  """``{step name: per-chip GiB}`` of the sampler steps of ``model`` compiled for ``topology``."""
  from ardiff.training import aot
  return aot.compile_sampler_steps(experiment_for_hf(model, seq_len=seq_len), topology, max_len=max_len)


def main(argv) -> int:
  p = argparse.ArgumentParser(prog=argv[0] if argv else "ardiff compile", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--from_hf", "--from-hf", dest="from_hf", required=True,
                 help="HF model directory, ORG/NAME in the local cache, or a config.json")
  p.add_argument("--topology", default="v6e:2x4", help="TPU slice, e.g. v5e:2x4, v6e:2x4")
  p.add_argument("--seq_len", "--seq-len", dest="seq_len", type=int, default=None, help="context (data.seq_len)")
  p.add_argument("--max_len", "--max-len", dest="max_len", type=int, default=None,
                 help="KV-cache slots per row (default 2 x seq_len)")
  args = p.parse_args(list(argv[1:]))
  from ardiff.training import aot
  aot.parse_topology(args.topology)
  c = experiment_for_hf(args.from_hf, seq_len=args.seq_len)
  params = c.model.to_dict()
  from ardiff.config import ModelConfig
  n = ModelConfig.from_dict(params).num_params()
  print(f"{c.name}: {n / 1e9:.2f}B params (bf16), context {c.data.seq_len}, objective {c.objective.kind}"
        + (f" B={c.objective.block_size}" if c.objective.kind != "ar" else "") + f", on {args.topology}")
  try:
    steps = aot.compile_sampler_steps(c, args.topology, max_len=args.max_len)
  except aot.DoesNotFitError as e:
    print(f"DOES NOT FIT: {e}")
    return 1
  for name, gib in steps.items():
    print(f"{name}: {gib:.2f} GiB per chip of {aot.hbm_per_chip(args.topology) / aot.GIB:.0f} GiB HBM -> fits")
  return 0
