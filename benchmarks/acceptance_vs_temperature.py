"""Tokens per target forward of the exact draft-and-verify samplers (TiDAR, DiffuSpec) against the sampling
temperature, on results.py's trained runs: does decoding colder make their drafts pass more often?

    python benchmarks/acceptance_vs_temperature.py [--runs_root runs/results] [--temperatures 0,0.5,1]

Each setting decodes results.py's 8 prompts one at a time (batch 1), ``--new_tokens`` tokens each, sampler seed =
the prompt's index, top-p 0.9 above temperature 0 (results.py's setting at temperature 1) and greedy decoding at 0.
It prints the mean over prompts of tokens per target forward and their spread (min-max). Both samplers are exact for
the target's law at every temperature, so their samples are the AR model's (or TiDAR's AR mode's) at that
temperature; only the speed changes.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
  if path not in sys.path:
    sys.path.insert(0, path)

# (label, sampler, target run, drafter run or None, options): the exact settings of results.py's table.
SETTINGS = (("TiDAR B=4", "tidar", "tidar_b4", None, {}),
            ("TiDAR B=4, from AR", "tidar", "tidar_b4_ar", None, {}),
            ("DiffuSpec k=4 S=1, bd3_b4 drafter", "diffuspec", "ar", "bd3_b4", dict(num_draft=4, draft_steps=1)),
            ("DiffuSpec k=4 S=2, bd3_b4 drafter", "diffuspec", "ar", "bd3_b4", dict(num_draft=4, draft_steps=2)),
            ("DiffuSpec k=4 S=1, fastdllm_b4 drafter", "diffuspec", "ar", "fastdllm_b4",
             dict(num_draft=4, draft_steps=1)),
            ("DiffuSpec k=4 S=2, fastdllm_b4 drafter", "diffuspec", "ar", "fastdllm_b4",
             dict(num_draft=4, draft_steps=2)))
PROMPT_WIDTH = 32  # every prompt padded to one width, so each setting compiles once


def tokens_per_forward(label, sampler, target, drafter, options, *, temperature: float, new_tokens: int,
                       loaded: dict) -> list:
  """Tokens per target forward of one setting, per prompt (results.py's PROMPTS, batch 1)."""
  import jax
  import numpy as np

  from ardiff import data as data_lib
  from ardiff.sampling.generate import encode_prompt, generate
  from results import PROMPTS, setting_inputs

  tok = data_lib.make_tokenizer("byte")
  exp, model, params, draft, block_size, options = setting_inputs(loaded, target, drafter, options)
  out = []
  for i, text in enumerate(PROMPTS):
    ids = encode_prompt(tok, text)
    prompt = np.zeros((1, PROMPT_WIDTH), np.int32)
    prompt[0, :len(ids)] = ids
    res = generate(sampler, params, model, prompt, np.asarray([len(ids)], np.int32), rng=jax.random.key(i),
                   num_tokens=new_tokens, objective=exp.objective, block_size=block_size, draft=draft,
                   temperature=temperature, top_p=0.9 if temperature > 0 else 1.0, eos_id=None, **options)
    out.append(int(np.asarray(res.lengths).max()) / int(res.nfe))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs_root", default=os.path.join("runs", "results"),
                 help="results.py's runs (ar, bd3_b4, fastdllm_b4, tidar_b4, tidar_b4_ar)")
  p.add_argument("--temperatures", default="0,0.5,1", help="comma-separated; 0 = greedy")
  p.add_argument("--new_tokens", type=int, default=128)
  args = p.parse_args(argv)
  try:
    temperatures = [float(t) for t in args.temperatures.split(",")]
  except ValueError:
    p.error(f"--temperatures must be comma-separated numbers, got {args.temperatures!r}.")
  if min(temperatures) < 0:
    p.error(f"temperatures must be >= 0 (0 = greedy), got {args.temperatures!r}.")
  if args.new_tokens < 1:
    p.error(f"--new_tokens must be >= 1, got {args.new_tokens}.")
  needed = sorted({s[2] for s in SETTINGS} | {s[3] for s in SETTINGS if s[3]})
  missing = [n for n in needed if not os.path.isdir(os.path.join(args.runs_root, n))]
  if missing:
    p.error(f"{args.runs_root} lacks the runs {missing}: train them first with `python benchmarks/results.py` "
            "(or pass --runs_root).")
  from ardiff import host_memory  # before JAX starts, as the other benchmarks
  host_memory.keep_freed_memory()
  import numpy as np

  from ardiff.training.main import load_run
  loaded = {n: load_run(os.path.join(args.runs_root, n)) for n in needed}
  print(f"tokens per target forward, batch 1, {args.new_tokens} new tokens, mean over 8 prompts (min-max); "
        "top-p 0.9 above temperature 0\n")
  print("| setting | " + " | ".join("greedy" if t == 0 else f"T = {t:g}" for t in temperatures) + " |")
  print("|---|" + "---|" * len(temperatures))
  for setting in SETTINGS:
    cells = []
    for t in temperatures:
      tpf = tokens_per_forward(*setting, temperature=t, new_tokens=args.new_tokens, loaded=loaded)
      cells.append(f"{np.mean(tpf):.2f} ({min(tpf):.2f}-{max(tpf):.2f})")
    print(f"| {setting[0]} | " + " | ".join(cells) + " |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
