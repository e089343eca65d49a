"""AR -> block-diffusion conversion: a trained AR model becomes an ardiff run directory ready to fine-tune.

``python -m ardiff convert --from-hf DIR --to block_diffusion --block-size B --out RUN_DIR`` imports a Hugging Face
Llama/Qwen2/Qwen3 directory (:func:`convert_hf_to_block_diffusion`); ``--from-run RUN_DIR`` takes an ardiff run (or
params) directory instead (:func:`convert_run_to_block_diffusion`). A published diffusion LM (SDAR, Fast-dLLM v2,
Dream, LLaDA: :mod:`ardiff.export.families`) imports as its own family, no ``--block-size`` needed
(:func:`import_family`), and ``DIR`` may be an ``ORG/NAME`` of the local Hugging Face cache
(:mod:`ardiff.export.hf_cache`). Either way ``RUN_DIR`` holds

* ``checkpoints/0``: the parameters as a step-0 train-state checkpoint (``{"params": ...}``, no optimizer state),
* ``config.json``: a validated block-diffusion experiment (model with its [MASK] id, objective with block size B,
  data with the tokenizer), which ``ardiff eval --run_dir RUN_DIR`` evaluates before any fine-tuning,
* ``conversion.json``: where it came from and which vocabulary rows were added,
* the tokenizer file (``tokenizer.json`` / ``tokenizer.model``) when the source has one.

Fine-tune it with ``python -m ardiff train --config configs/finetune.py:from=RUN_DIR`` (which reads the
model section from the directory) or with any config whose model matches plus ``--config.train.init_from=RUN_DIR``.

The [MASK] token (SDAR and Fast-dLLM v2 fine-tune with one; docs/algorithms.md §6): an id the source already has
is kept; otherwise one is added after the tokenizer's vocabulary and its embedding row (and ``lm_head`` column) start at
the mean of the existing rows (:func:`grow_vocab`), so the fresh token begins as an "average" input instead of a
random vector whose norm the trained network has never seen.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
from typing import Mapping, Optional, Sequence, Tuple

import jax.numpy as jnp
import ml_collections

from ardiff.checkpoints import params_dir as params_lib
from ardiff.checkpoints import run_dir as run_dir_lib
from ardiff.checkpoints import staging as io_lib
from ardiff.checkpoints.run_dir import save_params_checkpoint  # noqa: F401  (its old home)
from ardiff.config import DTYPES, ModelConfig
from ardiff.export.hf_config import read_hf_config
from ardiff.export.hf_import import import_hf
from ardiff.objectives.recipes import RECIPES  # written once there; also read by configs/finetune.py

log = logging.getLogger(__name__)

CONVERSION_FILE = "conversion.json"


# --------------------------------------------------------------------------------------------- vocabulary
def grow_vocab(params: Mapping, cfg: ModelConfig, new_vocab: int,
               reinit_ids: Sequence[int] = ()) -> Tuple[ModelConfig, dict]:
  """Grows the embedding ``[V, D]`` (and ``lm_head/kernel [D, V]``) to ``new_vocab`` rows.

  Added rows, and the existing rows listed in ``reinit_ids`` (e.g. an untrained padding row that becomes the
  [MASK]), are set to the mean of the source's ``V`` rows; every other row is unchanged, so the logits of the
  old tokens are unchanged too.
  """
  old = cfg.vocab_size
  if new_vocab < old:
    raise ValueError(f"cannot shrink the vocabulary from {old} to {new_vocab}.")
  bad = [i for i in reinit_ids if not 0 <= i < new_vocab]
  if bad:
    raise ValueError(f"rows {bad} to re-initialise lie outside the new vocabulary [0, {new_vocab}).")
  params = dict(params)

  def fill(table, axis):  # table with vocab on `axis`; mean over the source rows only
    mean = jnp.mean(table.astype(jnp.float32), axis=axis, keepdims=True).astype(table.dtype)
    if new_vocab > old:
      table = jnp.concatenate([table, jnp.repeat(mean, new_vocab - old, axis=axis)], axis=axis)
    for i in reinit_ids:
      table = table.at[i].set(mean[0]) if axis == 0 else table.at[:, i].set(mean[:, 0])
    return table

  params["embed_tokens"] = {**params["embed_tokens"], "embedding": fill(params["embed_tokens"]["embedding"], 0)}
  if "lm_head" in params:
    params["lm_head"] = {**params["lm_head"], "kernel": fill(params["lm_head"]["kernel"], 1)}
  return cfg.replace(vocab_size=new_vocab), params


def resolve_mask(cfg: ModelConfig, tokenizer: Optional[str], mask_token_id: Optional[int] = None):
  """``(mask id, tokenizer spec, vocab size, ids to initialise as new rows)`` for converting a model.

  Order: an explicit ``mask_token_id``; the model's recorded ``cfg.mask_token_id``; the tokenizer's [MASK] (a
  byte tokenizer without one gets ``mask`` appended to its specials; an ``hf:``/``sentencepiece:`` tokenizer
  appends a virtual one after its vocabulary); with no tokenizer known, the new id ``cfg.vocab_size``.
  """
  from ardiff.data.tokenizers import ByteTokenizer, make_tokenizer
  vocab, new_ids = cfg.vocab_size, []
  tok = None
  if tokenizer is not None:
    tok = make_tokenizer(tokenizer)
    vocab = max(vocab, tok.vocab_size)
  if mask_token_id is not None:
    mask = int(mask_token_id)
    if mask < 0:
      raise ValueError(f"mask_token_id={mask} must be >= 0.")
    if mask >= cfg.vocab_size:
      new_ids.append(mask)
  elif cfg.mask_token_id is not None:
    mask = cfg.mask_token_id
  elif isinstance(tok, ByteTokenizer):
    if tok.mask_id is None:
      tokenizer = "byte:" + ",".join(tok.specials + ("mask",))
      tok = ByteTokenizer(tok.specials + ("mask",))
      vocab = max(vocab, tok.vocab_size)
      new_ids.append(tok.mask_id)
    mask = tok.mask_id
  elif tok is not None:
    mask = tok.mask_id
    if mask >= getattr(tok, "base_vocab_size", mask + 1):  # a virtual id: no trained row behind it
      new_ids.append(mask)
  else:
    mask = cfg.vocab_size
    new_ids.append(mask)
  if tok is not None and tok.mask_id is not None and tok.mask_id != mask:
    raise ValueError(f"mask_token_id={mask} differs from the tokenizer's [MASK] id {tok.mask_id} ({tokenizer}); "
                     f"pass --mask-token-id {tok.mask_id} or none.")
  return mask, tokenizer, max(vocab, mask + 1), new_ids


# ------------------------------------------------------------------------------------------------- convert
def convert_to_block_diffusion(cfg: ModelConfig, params: Mapping, out_run_dir, *, block_size: int,
                               base_config: Optional[ml_collections.ConfigDict] = None,
                               tokenizer: Optional[str] = None, mask_token_id: Optional[int] = None,
                               seq_len: Optional[int] = None, recipe: Optional[str] = "fastdllm_v2",
                               overwrite: bool = False, source: Optional[Mapping] = None,
                               record: Optional[Mapping] = None, extra_files: Sequence[str] = ()) -> str:
  """Writes a block-diffusion run directory for an AR model ``(cfg, params)``; returns its path.

  ``base_config``: experiment config providing the non-model sections (default
  :func:`ardiff.experiment.base_config`); its objective gets ``kind``, ``block_size`` and the fields of
  ``recipe`` (a key of :data:`ardiff.objectives.recipes.RECIPES`; None keeps ``base_config``'s). ``tokenizer``: the
  source's tokenizer spec (an ``hf:``/``sentencepiece:`` file is copied into the run directory); None keeps
  ``base_config``'s. ``record``: more entries for ``conversion.json`` (an imported family's ``family`` and
  ``decoding``); ``extra_files``: files copied into the run directory (``tokenizer_config.json`` with its chat
  template). Everything is validated before anything is written.
  """
  from ardiff import experiment as experiment_lib
  run_dir = io_lib.check_output_dir(out_run_dir, overwrite=overwrite)
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size={block_size!r} must be a positive integer.")
  if recipe is not None and recipe not in RECIPES:
    raise ValueError(f"recipe={recipe!r} must be one of {sorted(RECIPES)} or None.")
  params_lib.check_params_match(params, cfg, "the source parameters")
  c = copy.deepcopy(base_config) if base_config is not None else experiment_lib.base_config()
  mask, tokenizer, vocab, new_ids = resolve_mask(cfg, tokenizer, mask_token_id)
  tok_file = params_lib.tokenizer_file_of(tokenizer) if tokenizer is not None else None
  if tok_file is not None:  # the run directory gets its own copy, referenced by its final path
    if not os.path.isfile(tok_file):
      raise FileNotFoundError(f"tokenizer file {tok_file} not found.")
    tokenizer = f"{tokenizer.partition(':')[0]}:{os.path.join(run_dir, os.path.basename(tok_file))}"
  reinit = [i for i in new_ids if i < cfg.vocab_size]
  cfg, params = grow_vocab(params, cfg, vocab, reinit_ids=reinit)
  cfg = cfg.replace(mask_token_id=int(mask))

  with c.unlocked():
    c.name = os.path.basename(run_dir)
    c.model = ml_collections.ConfigDict(cfg.to_dict())
    c.objective.kind = "block_diffusion"
    c.objective.block_size = int(block_size)
    for k, v in (RECIPES[recipe] if recipe else {}).items():
      c.objective[k] = v
    if seq_len is not None:
      c.data.seq_len = int(seq_len)
    if tokenizer is not None:
      c.data.tokenizer = tokenizer
    c.train.run_dir = run_dir
    c.train.init_from = ""
  if c.data.seq_len % block_size:
    raise ValueError(f"block size {block_size} does not divide data.seq_len={c.data.seq_len}; pass --seq-len "
                     f"{max(block_size, c.data.seq_len // block_size * block_size)} (a multiple of {block_size}).")
  experiment_lib.validate(c)  # fail here, before writing, not at train time
  record = {"source": dict(source or {}), "block_size": int(block_size), "recipe": recipe,
            "mask_token_id": int(mask), "vocab_size": vocab, "mean_initialised_rows": sorted(set(new_ids)),
            **dict(record or {})}
  with io_lib.staged_output(run_dir, overwrite=overwrite) as tmp:
    run_dir_lib.save_params_checkpoint(params, os.path.join(tmp, run_dir_lib.CHECKPOINTS), step=0)
    run_dir_lib.write_config(tmp, c)
    with open(os.path.join(tmp, CONVERSION_FILE), "w") as f:
      json.dump(record, f, indent=2)
    if tok_file is not None:
      shutil.copy(tok_file, os.path.join(tmp, os.path.basename(tok_file)))
    for path in extra_files:
      shutil.copy(path, os.path.join(tmp, os.path.basename(path)))
  return run_dir


def _load_config_file(path: Optional[str]) -> Optional[ml_collections.ConfigDict]:
  """``get_config()`` of a ``configs/*.py`` file (``path:arg`` passes ``arg``; found as ``train --config`` finds
  it: relative to the cwd, then among the shipped configs), or None."""
  if path is None:
    return None
  from ardiff import cli_flags
  return cli_flags.load_config_file(path)


def hf_tokenizer_spec(hf_dir: str, hf_config: Mapping) -> Optional[str]:
  """The tokenizer of an HF directory: its ``tokenizer.json`` / ``tokenizer.model``, else the spec that an ardiff
  export recorded (``config["ardiff"]["tokenizer"]``, e.g. ``"byte"``), else None."""
  if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
    return "hf:" + os.path.join(hf_dir, "tokenizer.json")
  if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
    return "sentencepiece:" + os.path.join(hf_dir, "tokenizer.model")
  recorded = (hf_config.get("ardiff") or {}).get("tokenizer")
  return recorded if isinstance(recorded, str) and recorded.startswith("byte") else None


def convert_hf_to_block_diffusion(hf_dir, out_run_dir, *, block_size: int, config_file: Optional[str] = None,
                                  mask_token_id: Optional[int] = None, seq_len: Optional[int] = None,
                                  recipe: Optional[str] = "fastdllm_v2", dtype: str = "float32",
                                  overwrite: bool = False) -> str:
  """Imports the HF Llama/Qwen2 directory ``hf_dir`` and writes a block-diffusion run at ``out_run_dir``.

  ``config_file``: a ``configs/*.py`` giving the non-model sections (data, optimizer, objective recipe).
  """
  hf_dir = io_lib.clean_path(hf_dir)
  io_lib.check_output_dir(out_run_dir, overwrite=overwrite)  # before the (slow) import
  hf_config = read_hf_config(hf_dir)
  cfg, params = import_hf(hf_dir, dtype=dtype)
  tokenizer = hf_tokenizer_spec(hf_dir, hf_config)
  if tokenizer is None:
    log.warning("%s has no tokenizer file and no recorded ardiff tokenizer; the run keeps data.tokenizer of the "
                "base config. Set --config.data.tokenizer when fine-tuning.", hf_dir)
  return convert_to_block_diffusion(cfg, params, out_run_dir, block_size=block_size,
                                    base_config=_load_config_file(config_file), tokenizer=tokenizer,
                                    mask_token_id=mask_token_id, seq_len=seq_len, recipe=recipe,
                                    overwrite=overwrite, source={"hf_dir": hf_dir})


def import_family(hf_dir, out_run_dir, *, family=None, block_size: Optional[int] = None,
                  mask_token_id: Optional[int] = None, seq_len: Optional[int] = None,
                  config_file: Optional[str] = None, dtype: str = "float32", overwrite: bool = False) -> str:
  """A published diffusion LM (SDAR, Fast-dLLM v2, Dream, LLaDA: :mod:`ardiff.export.families`) in its own
  on-disk layout -> an ardiff block-diffusion run at ``out_run_dir`` that samples the family's way.

  ``block_size``, ``mask_token_id``, ``seq_len`` default to the family's (the checkpoint's config first).
  """
  from ardiff.export import families
  hf_dir = io_lib.clean_path(hf_dir)
  io_lib.check_output_dir(out_run_dir, overwrite=overwrite)
  raw = read_hf_config(hf_dir)
  where = os.path.join(hf_dir, "config.json")
  fam = families.detect(raw, where) if family is None else families.FAMILIES[family]
  if fam is None:
    raise ValueError(f"{where} is a plain {raw.get('architectures')} checkpoint, not one of the diffusion families "
                     f"{sorted(families.FAMILIES)}; convert it with --block-size B (AR -> block diffusion).")
  base = families.base_config(fam, raw, where)
  cfg, params = import_hf(hf_dir, dtype=dtype, hf_config=base, kind=fam.base, rename=families.tensor_renamer(fam))
  mask = families.mask_id(fam, raw, cfg.vocab_size, mask_token_id, model_dir=hf_dir)
  if seq_len is None:
    seq_len = min(fam.default_seq_len, int(base.get("max_position_embeddings") or fam.default_seq_len))
  block = families.block_size(fam, raw, seq_len, block_size)
  if not fam.bidirectional:
    seq_len = max(block, seq_len // block * block)
  base_exp = _load_config_file(config_file)
  if base_exp is None:
    from ardiff import experiment as experiment_lib
    base_exp = experiment_lib.base_config()
  with base_exp.unlocked():
    for k, v in families.objective_fields(fam, block).items():
      base_exp.objective[k] = v
  tokenizer = hf_tokenizer_spec(hf_dir, raw)
  if tokenizer is None:
    log.warning("%s has no tokenizer.json / tokenizer.model; the run keeps data.tokenizer of the base config.",
                hf_dir)
  chat = os.path.join(hf_dir, "tokenizer_config.json")
  decoding = families.decoding_defaults(fam, block)
  if tokenizer is not None:  # ardiff gives a tokenizer without BOS a virtual one; these models never saw it
    from ardiff.data.tokenizers import make_tokenizer
    tok = make_tokenizer(tokenizer)
    decoding["add_bos"] = bool(tok.bos_id < getattr(tok, "base_vocab_size", tok.bos_id + 1))
  record = {"family": fam.name, "base_architecture": fam.base, "bidirectional": fam.bidirectional,
            "token_shift": fam.token_shift, "decoding": decoding}
  return convert_to_block_diffusion(cfg, params, out_run_dir, block_size=block, base_config=base_exp,
                                    tokenizer=tokenizer, mask_token_id=mask, seq_len=seq_len, recipe=None,
                                    overwrite=overwrite, source={"hf_dir": hf_dir, "family": fam.name},
                                    record=record, extra_files=[chat] if os.path.isfile(chat) else [])


def convert_run_to_block_diffusion(run_dir, out_run_dir, *, block_size: int, config_file: Optional[str] = None,
                                   mask_token_id: Optional[int] = None, seq_len: Optional[int] = None,
                                   recipe: Optional[str] = "fastdllm_v2", use_ema: bool = False,
                                   overwrite: bool = False) -> str:
  """An ardiff AR run (or params directory) -> a block-diffusion run; the source's data, optimizer and train
  sections are kept unless ``config_file`` is given."""
  run_dir = io_lib.clean_path(run_dir)
  io_lib.check_output_dir(out_run_dir, overwrite=overwrite)
  exp, _, params = run_dir_lib.load_run(run_dir, use_ema=use_ema)
  if exp.objective.kind == "tidar":
    log.warning("%s is a TiDAR run; converting its weights as if they were AR.", run_dir)
  base = _load_config_file(config_file)
  return convert_to_block_diffusion(exp.model, params, out_run_dir, block_size=block_size,
                                    base_config=exp.raw if base is None else base,
                                    tokenizer=exp.data.tokenizer, mask_token_id=mask_token_id, seq_len=seq_len,
                                    recipe=recipe, overwrite=overwrite,
                                    source={"run_dir": run_dir, "use_ema": bool(use_ema)})


# ----------------------------------------------------------------------------------------------------- CLI
def main(argv) -> int:
  """``python -m ardiff convert (--from-hf DIR | --from-run DIR) --to block_diffusion --block-size B --out DIR``."""
  parser = argparse.ArgumentParser(prog=argv[0] if argv else "ardiff convert",
                                   description="Convert an AR model (Hugging Face Llama/Qwen2 directory or ardiff "
                                               "run) into a block-diffusion run directory ready to fine-tune.")
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--from-hf", "--from_hf", dest="from_hf",
                   help="HF model directory (config.json + *.safetensors), or ORG/NAME found in the local Hugging "
                        "Face cache (never downloaded). SDAR, Fast-dLLM v2, Dream and LLaDA checkpoints import as "
                        "their family (block size, [MASK], token shift and sampler defaults included)")
  src.add_argument("--from-run", "--from_run", dest="from_run",
                   help="ardiff run directory (latest checkpoint) or params directory")
  parser.add_argument("--to", default="block_diffusion", choices=("block_diffusion",))
  parser.add_argument("--block-size", "--block_size", dest="block_size", type=int, default=None,
                      help="block size B (required for AR sources; a diffusion family's default otherwise)")
  parser.add_argument("--out", required=True, help="run directory to create")
  parser.add_argument("--config", default=None,
                      help="configs/*.py providing the data/optimizer/objective sections (default: the source "
                           "run's, or ardiff.experiment.base_config() for --from-hf)")
  parser.add_argument("--mask-token-id", "--mask_token_id", dest="mask_token_id", type=int, default=None)
  parser.add_argument("--seq-len", "--seq_len", dest="seq_len", type=int, default=None)
  parser.add_argument("--recipe", default="fastdllm_v2", choices=sorted(RECIPES) + ["config"],
                      help="objective recipe (token_shift, complementary_masks, weighting); 'config' keeps the "
                           "objective of --config / the source run")
  parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter dtype (--from-hf)")
  parser.add_argument("--ema", action="store_true", help="convert the EMA parameters (--from-run)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(list(argv[1:]))
  common = dict(block_size=args.block_size, config_file=args.config, mask_token_id=args.mask_token_id,
                seq_len=args.seq_len, recipe=None if args.recipe == "config" else args.recipe,
                overwrite=args.overwrite)
  if args.from_hf:
    if args.ema:
      parser.error("--ema applies to --from-run only.")
    from ardiff.errors import UsageError
    from ardiff.export import families, hf_cache
    hf_dir = hf_cache.resolve_model_dir(args.from_hf)
    fam = families.detect(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"))
    if fam is not None:
      run_dir = import_family(hf_dir, args.out, block_size=args.block_size, mask_token_id=args.mask_token_id,
                              seq_len=args.seq_len, config_file=args.config, dtype=args.dtype,
                              overwrite=args.overwrite)
      print(f"Wrote {run_dir} ({fam.name}: {fam.base} base). Sample with:\n  python -m ardiff sample "
            f"--checkpoint {run_dir} --prompt TEXT")
      return 0
    if args.block_size is None:
      raise UsageError(f"--block-size is required: {args.from_hf} is an AR checkpoint (not one of the diffusion "
                       f"families {', '.join(sorted(families.FAMILIES))}).")
    run_dir = convert_hf_to_block_diffusion(hf_dir, args.out, dtype=args.dtype, **common)
  else:
    if args.block_size is None:
      parser.error("--from-run needs --block-size B.")
    run_dir = convert_run_to_block_diffusion(args.from_run, args.out, use_ema=args.ema, **common)
  print(f"Wrote {run_dir}. Fine-tune with:\n  python -m ardiff train --config configs/finetune.py:from={run_dir}")
  return 0
