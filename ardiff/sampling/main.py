"""``python -m ardiff sample --checkpoint DIR --prompt TEXT [--sampler ...]``: generate from a trained run (or an
exported params directory); prints the samples, tokens/s, NFE and tokens per forward.

    python -m ardiff sample --checkpoint runs/default --prompt "ROMEO." --strategy threshold --threshold 0.9
    python -m ardiff sample --checkpoint runs/tidar_shakespeare --sampler tidar
    python -m ardiff sample --checkpoint runs/ar_shakespeare --sampler speculative --draft_checkpoint runs/ar_small
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from ardiff.sampling.block_diffusion import KV_WRITES, STRATEGIES
from ardiff.sampling.generate import DEFAULT_PROMPT, SAMPLERS, default_sampler, encode_prompt, generate


def parse_args(argv):
  p = argparse.ArgumentParser(prog=argv[0], description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--checkpoint", "--run_dir", dest="run_dir", required=True,
                 help="a run directory of `ardiff train`, or a params directory of `ardiff export --to params`")
  p.add_argument("--prompt", default=DEFAULT_PROMPT)
  p.add_argument("--sampler", choices=("auto",) + SAMPLERS, default="auto",
                 help="auto: the family the run was trained as (block diffusion, TiDAR draft+verify, or AR)")
  p.add_argument("--num_tokens", type=int, default=256, help="new tokens per sample")
  p.add_argument("--num_samples", type=int, default=1)
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--top_p", type=float, default=0.9)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ema", action="store_true", help="sample with the EMA parameters")
  bd = p.add_argument_group("block diffusion")
  bd.add_argument("--block_size", type=int, default=None, help="default: the run's objective.block_size")
  bd.add_argument("--strategy", choices=STRATEGIES, default="threshold", help="unmasking rule")
  bd.add_argument("--threshold", type=float, default=0.9, help="τ of threshold / dynamic")
  bd.add_argument("--steps_per_block", type=int, default=None, help="k = ceil(B/steps) for static rules")
  bd.add_argument("--sub_block_size", type=int, default=None, help="Fast-dLLM v2 sub-blocks")
  bd.add_argument("--kv_write", choices=KV_WRITES, default="fused", help="clean-block K/V write")
  spec = p.add_argument_group("speculative decoding")
  spec.add_argument("--draft_checkpoint", default=None, help="a small AR run (same tokenizer) as the drafter")
  spec.add_argument("--num_draft", type=int, default=4, help="drafted tokens per step")
  return p.parse_args(argv[1:])


def main(argv) -> int:
  from ardiff import data as data_lib
  from ardiff.training import main as train_main

  args = parse_args(argv)
  exp, model, params = train_main.load_run(args.run_dir, use_ema=args.ema)
  tok = data_lib.make_tokenizer(exp.data["tokenizer"])
  sampler = default_sampler(exp.objective, model) if args.sampler == "auto" else args.sampler
  options, draft = {}, None
  if sampler == "block_diffusion":
    options = dict(strategy=args.strategy, threshold=args.threshold, steps_per_block=args.steps_per_block,
                   sub_block_size=args.sub_block_size, kv_write=args.kv_write)
  elif sampler == "speculative":
    if not args.draft_checkpoint:
      raise SystemExit("--sampler speculative needs --draft_checkpoint DIR (a small AR run with the same vocab).")
    _, draft_model, draft_params = train_main.load_run(args.draft_checkpoint)
    draft, options = (draft_params, draft_model), dict(num_draft=args.num_draft)
  ids = encode_prompt(tok, args.prompt)
  prompt = np.tile(np.asarray(ids, np.int32), (args.num_samples, 1))
  lengths = np.full(args.num_samples, len(ids))

  def run():
    res = generate(sampler, params, model, prompt, lengths, rng=jax.random.key(args.seed),
                   num_tokens=args.num_tokens, objective=exp.objective, block_size=args.block_size, draft=draft,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, eos_id=tok.eos_id, **options)
    jax.block_until_ready(res.tokens)
    return res

  start = time.perf_counter()
  run()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  res = run()  # timed without compilation
  seconds = time.perf_counter() - start
  tokens, n_new = np.asarray(res.tokens), np.asarray(res.lengths)
  for row, n in zip(tokens, n_new):
    print(tok.decode(ids) + tok.decode([int(t) for t in row[:n]]))
    print("-" * 40)
  nfe = int(res.nfe)
  print(f"sampler={sampler} tokens={int(n_new.sum())} time={seconds:.3f}s (compile {compile_s:.1f}s) "
        f"tokens/s={n_new.sum() / seconds:.1f} NFE={nfe} tokens/forward={n_new.max() / max(nfe, 1):.2f}")
  return 0
