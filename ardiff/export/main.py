"""``python -m ardiff export``: a trained run as a Hugging Face directory, a portable params directory, or StableHLO.

  python -m ardiff export --run_dir RUN --to hf --out DIR [--ema]
  python -m ardiff export --run_dir RUN --to params --out DIR [--ema] [--format safetensors|orbax]
  python -m ardiff export --run_dir RUN --to stablehlo --out DIR --max_len N --prompt_len P

``RUN`` is a run directory (``ardiff train`` / ``ardiff convert``) or a params directory. ``--to hf`` writes
``config.json`` + ``model.safetensors`` that ``transformers`` loads (``LlamaForCausalLM``, or ``Qwen2ForCausalLM``
with q/k/v biases); the run's objective goes into ``config["ardiff"]`` (kind, block size, [MASK] id, token shift,
decoding defaults), its tokenizer's special ids into ``bos_token_id``/``eos_token_id`` and
``config["ardiff"]["special_tokens"]``, and an ``hf:``/``sentencepiece:`` tokenizer file is copied as
``tokenizer.json``/``tokenizer.model``. Every command refuses a non-empty ``--out`` unless ``--overwrite``, and
writes nothing when it fails (:mod:`ardiff.checkpoints.staging`).
"""

from __future__ import annotations

import argparse
import os

from ardiff.checkpoints import staging as io_lib

# The defaults of `ardiff sample`, recorded so that an HF user decodes a block-diffusion export the way ardiff does.
DECODING_DEFAULTS = {"block_diffusion": {"sampler": "block_diffusion", "strategy": "threshold", "threshold": 0.9,
                                         "temperature": 1.0, "top_p": 0.9},
                     "ar": {"sampler": "ar", "temperature": 1.0, "top_p": 0.9}}
HF_TOKENIZER_NAMES = {"hf": "tokenizer.json", "sentencepiece": "tokenizer.model", "sp": "tokenizer.model",
                      "spm": "tokenizer.model"}


def hf_extra_config(exp) -> dict:
  """``config.json`` additions for an experiment: HF special-token ids and the ``"ardiff"`` section."""
  from ardiff.data import tokenizers
  spec = exp.data.tokenizer
  tok = tokenizers.make_tokenizer(spec)
  specials = {k: getattr(tok, f"{k}_id", None) for k in ("bos", "eos", "mask", "pad")}
  kind = exp.objective.kind
  ardiff = {"objective": kind, "seq_len": exp.data.seq_len,
            "special_tokens": {k: v for k, v in specials.items() if v is not None}}
  tok_kind = spec.strip().partition(":")[0].lower()
  ardiff["tokenizer"] = spec if tok_kind == "byte" else HF_TOKENIZER_NAMES[tok_kind]
  if kind in ("block_diffusion", "tidar"):
    ardiff.update(block_size=int(exp.objective.block_size), token_shift=bool(exp.objective.token_shift))
  decoding = dict(DECODING_DEFAULTS["block_diffusion" if kind == "block_diffusion" else "ar"])
  if kind == "block_diffusion":
    decoding["block_size"] = int(exp.objective.block_size)
  ardiff["decoding"] = decoding
  if exp.model.mask_token_id is not None:
    ardiff["mask_token_id"] = int(exp.model.mask_token_id)
  top = {"bos_token_id": specials["bos"], "eos_token_id": specials["eos"]}
  if specials["pad"] is not None:
    top["pad_token_id"] = specials["pad"]
  return {**top, "ardiff": ardiff}


def export_run_to_hf(run_dir, out_dir, *, use_ema: bool = False, overwrite: bool = False) -> str:
  """The latest parameters (or EMA) of a run as a ``transformers`` directory; returns ``out_dir``."""
  from ardiff.export import hf as hf_lib
  from ardiff.checkpoints import params_dir as params_lib
  from ardiff.checkpoints.run_dir import load_run
  io_lib.check_output_dir(out_dir, overwrite=overwrite)  # refuse before the (slow) restore
  exp, _, params = load_run(io_lib.clean_path(run_dir), use_ema=use_ema)
  tok_file = params_lib.tokenizer_file_of(exp.data.tokenizer)
  files = []
  if tok_file is not None:
    files.append((tok_file, HF_TOKENIZER_NAMES[exp.data.tokenizer.strip().partition(":")[0].lower()]))
  extra = hf_extra_config(exp)
  run = io_lib.clean_path(run_dir)
  from ardiff.sampling import family_defaults  # an imported family keeps its decoding (and its chat template)
  decoding = family_defaults.read_decoding(run)
  if decoding:
    extra["ardiff"]["decoding"] = decoding
  chat = os.path.join(run, "tokenizer_config.json")
  if "://" not in run and os.path.isfile(chat):
    files.append(chat)
  return hf_lib.export_hf(params, exp.model, out_dir, tokenizer_files=files, extra_config=extra,
                          max_position_embeddings=max(4096, exp.data.seq_len), overwrite=overwrite)


def export_run_to_stablehlo(run_dir, out_dir, *, use_ema: bool = False, overwrite: bool = False, **kw) -> str:
  import importlib
  # lazy: only this format needs the serving wrappers (and ardiff.sampling); looked up in sys.modules, so tests can
  # stand in for it
  stablehlo = importlib.import_module("ardiff.export.stablehlo")
  io_lib.check_output_dir(out_dir, overwrite=overwrite)
  with io_lib.staged_output(out_dir, overwrite=overwrite) as tmp:
    stablehlo.serving_export_from_run(io_lib.clean_path(run_dir), tmp, use_ema=use_ema, **kw)
  return io_lib.clean_path(out_dir)


def main(argv) -> int:
  p = argparse.ArgumentParser(prog=argv[0] if argv else "ardiff export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run_dir", "--run-dir", "--checkpoint", dest="run_dir", required=True,
                 help="run directory (latest checkpoint) or params directory")
  p.add_argument("--to", required=True, choices=("hf", "params", "stablehlo"))
  p.add_argument("--out", required=True, help="directory to create")
  p.add_argument("--ema", action="store_true", help="export the EMA parameters (runs trained with an EMA)")
  p.add_argument("--format", choices=("safetensors", "orbax"), default="safetensors", help="--to params only")
  p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
  p.add_argument("--max_len", "--max-len", dest="max_len", type=int, default=None, help="--to stablehlo: cache slots")
  p.add_argument("--prompt_len", "--prompt-len", dest="prompt_len", type=int, default=None,
                 help="--to stablehlo: padded prompt width")
  p.add_argument("--platforms", default="cpu", help="--to stablehlo: comma-separated lowering targets")
  args = p.parse_args(list(argv[1:]))
  if args.to != "params" and args.format != "safetensors":
    p.error("--format applies to --to params only.")
  if args.to != "stablehlo" and (args.max_len is not None or args.prompt_len is not None):
    p.error("--max_len/--prompt_len apply to --to stablehlo only.")
  common = dict(use_ema=args.ema, overwrite=args.overwrite)
  if args.to == "hf":
    out = export_run_to_hf(args.run_dir, args.out, **common)
  elif args.to == "params":
    from ardiff.export import params as params_lib
    out = params_lib.export_params(args.run_dir, args.out, format=args.format, **common)
  else:
    if args.max_len is None or args.prompt_len is None:
      p.error("--to stablehlo needs --max_len and --prompt_len.")
    if not 1 <= args.prompt_len <= args.max_len:
      p.error(f"--to stablehlo needs 1 <= --prompt_len <= --max_len, got --prompt_len={args.prompt_len} "
              f"--max_len={args.max_len}.")
    out = export_run_to_stablehlo(args.run_dir, args.out, max_len=args.max_len, prompt_len=args.prompt_len,
                                  platforms=tuple(x for x in args.platforms.split(",") if x), **common)
  print(f"Wrote {out}")
  return 0
