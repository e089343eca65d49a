"""``python -m ardiff sample --run_dir DIR --prompt TEXT``: generate from a trained run; prints tokens/s and NFE."""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from ardiff.sampling.ar import sample_ar
from ardiff.sampling.block_diffusion import STRATEGIES, sample_block_diffusion
from ardiff.sampling.generate import DEFAULT_PROMPT, encode_prompt


def main(argv) -> int:
  from ardiff import data as data_lib
  from ardiff.training import main as train_main

  p = argparse.ArgumentParser(prog=argv[0], description=__doc__)
  p.add_argument("--checkpoint", "--run_dir", dest="run_dir", required=True, help="a run directory of `ardiff train`")
  p.add_argument("--prompt", default=DEFAULT_PROMPT)
  p.add_argument("--sampler", choices=("auto", "ar", "block_diffusion"), default="auto",
                 help="auto: the family the run was trained as (TiDAR runs sample in their AR mode)")
  p.add_argument("--strategy", choices=STRATEGIES, default="threshold", help="block-diffusion unmasking rule")
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--num_tokens", type=int, default=256)
  p.add_argument("--num_samples", type=int, default=1)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_p", type=float, default=0.9)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ema", action="store_true", help="sample with the EMA parameters")
  args = p.parse_args(argv[1:])

  exp, model, params = train_main.load_run(args.run_dir, use_ema=args.ema)
  tok = data_lib.make_tokenizer(exp.data["tokenizer"])
  sampler = args.sampler
  if sampler == "auto":
    sampler = "block_diffusion" if exp.objective.kind == "block_diffusion" else "ar"
  bs = exp.objective.block_size
  ids = encode_prompt(tok, args.prompt, multiple_of=bs if sampler == "block_diffusion" else 1)
  prompt = np.tile(np.asarray(ids, np.int32), (args.num_samples, 1))
  lengths = np.full(args.num_samples, len(ids))

  def run(rng):
    if sampler == "ar":
      res = sample_ar(params, model, prompt, lengths, rng=rng, max_new_tokens=args.num_tokens,
                      temperature=args.temperature, top_p=args.top_p, eos_id=tok.eos_id)
    else:
      res = sample_block_diffusion(params, model, prompt, lengths, rng=rng, block_size=bs,
                                   num_blocks=max(1, args.num_tokens // bs), strategy=args.strategy,
                                   threshold=args.threshold, temperature=args.temperature, top_p=args.top_p,
                                   eos_id=tok.eos_id)
    jax.block_until_ready(res.tokens)
    return res

  run(jax.random.key(args.seed))  # compile
  start = time.perf_counter()
  res = run(jax.random.key(args.seed))
  seconds = time.perf_counter() - start
  tokens, n_new = np.asarray(res.tokens), np.asarray(res.lengths)
  for row, n in zip(tokens, n_new):
    print(tok.decode(ids) + tok.decode([int(t) for t in row[:n]]))
    print("-" * 40)
  nfe = int(res.nfe)
  print(f"sampler={sampler} tokens={int(n_new.sum())} time={seconds:.3f}s tokens/s={n_new.sum() / seconds:.1f} "
        f"NFE={nfe} tokens/forward={n_new.max() / max(nfe, 1):.2f}")
  return 0
