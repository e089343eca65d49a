"""Eval and every sampler on one run directory, as one JAX job of however many processes the environment says
(``ardiff.distributed`` variables); process 0 writes the numbers and tokens as JSON to ``argv[2]``.

Used by tests/test_multihost.py: 2 processes x 2 devices must give what 1 process x 4 devices gives. The run is a
block-diffusion model; the AR, TiDAR, speculative and DiffuSpec samplers run it as target (and as its own drafter):
what is compared is that each sampler computes the same thing under both process layouts, not what it means.
"""

import json
import sys

import jax
import numpy as np

from ardiff import distributed


def main(run_dir: str, out_path: str) -> None:
  distributed.initialize_from_env()
  from ardiff.checkpoints.run_dir import load_run
  from ardiff.data import make_tokenizer
  from ardiff.sampling.generate import encode_prompt, generate
  from ardiff.training import main as train_main

  exp, model, params = load_run(run_dir)
  tok = make_tokenizer(exp.data.tokenizer)
  result = {"eval": train_main.evaluate_run(run_dir, max_batches=2)}
  ids = encode_prompt(tok, "ROMEO.\n")
  prompt = np.tile(np.asarray(ids, np.int32), (2, 1))
  lengths = np.array([len(ids), len(ids) - 2])  # ragged
  common = dict(rng=jax.random.key(3), num_tokens=8, objective=exp.objective, temperature=1.0, top_p=0.9,
                eos_id=tok.eos_id)
  runs = {
      "block_diffusion": dict(sampler="block_diffusion", strategy="topk_confidence"),
      "ar": dict(sampler="ar"),
      "tidar": dict(sampler="tidar"),
      "speculative": dict(sampler="speculative", draft=(params, model), num_draft=2),
      "diffuspec": dict(sampler="diffuspec", draft=(params, model), num_draft=2,
                        block_size=exp.objective.block_size),
  }
  for name, kw in runs.items():
    kw = dict(kw)
    res = generate(kw.pop("sampler"), params, model, prompt, lengths, **common, **kw)
    result[name] = {"tokens": np.asarray(res.tokens).tolist(), "lengths": np.asarray(res.lengths).tolist()}
  if distributed.is_main():
    with open(out_path, "w") as f:
      json.dump(result, f, sort_keys=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
