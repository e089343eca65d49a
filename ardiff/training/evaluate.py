"""Evaluation: validation loss, NELBO-perplexity (an upper bound) for diffusion, exact perplexity for AR, bits per
token and bits per byte. ``evaluate(...)`` is what ``python -m ardiff eval`` and the training loop both call."""

from __future__ import annotations

import math
from typing import Iterable, Optional

import jax
import numpy as np

from ardiff import distributed, objectives
from ardiff.model import Transformer


def make_jitted_eval(model: Transformer, objective: objectives.ObjectiveConfig):
  return jax.jit(objectives.make_eval_fn(model, objective))


def evaluate(params, batches: Iterable[dict], *, model: Transformer, objective: objectives.ObjectiveConfig,
             rng: jax.Array, max_batches: Optional[int] = None, token_bytes=None, eval_fn=None,
             put_batch=None) -> dict:
  """Sums over batches, then ratios (exact aggregation). Diffusion: ``nelbo`` uses the count estimator over the
  full noise range, so ``ppl_upper_bound = exp(nelbo per token)`` bounds the true perplexity in expectation.

  Under several processes ``batches`` are each process's rows of the global batches (``put_batch`` makes them
  global): all processes stop at the first batch that any of them lacks, and the byte count is summed over them.
  ``token_bytes`` (:func:`ardiff.data.tokenizers.token_byte_lengths`, int ``[vocab]``) adds ``bits_per_byte``.
  """
  eval_fn = eval_fn or make_jitted_eval(model, objective)
  total, count, n_bytes, n_batches = 0.0, 0, 0, 0
  key = "nll_sum" if objective.kind in ("ar", "tidar") else "nelbo_sum"
  many = jax.process_count() > 1
  batches = iter(batches)
  while max_batches is None or n_batches < max_batches:
    batch = next(batches, None)
    if distributed.any_process(batch is None) if many else batch is None:  # same stop on every process
      break
    rng, sub = jax.random.split(rng)
    out = eval_fn(params, put_batch(batch) if put_batch else batch, sub)
    total += float(out[key])
    count += int(out["num_targets"])
    tokens = np.asarray(batch["tokens"])
    seg = np.asarray(batch["segment_ids"]) if "segment_ids" in batch else np.ones_like(tokens)
    if token_bytes is not None:
      n_bytes += int(np.sum(np.where(seg != 0, token_bytes[tokens], 0)))
    n_batches += 1
  if many:
    n_bytes = distributed.sum_processes(n_bytes)
  if count == 0:
    raise ValueError("evaluation saw no target tokens: is the evaluation split empty or smaller than one batch?")
  per_token = total / count
  name = "nll" if key == "nll_sum" else "nelbo"
  result = {f"{name}_per_token": per_token, "bits_per_token": per_token / math.log(2), "num_targets": count,
            "num_batches": n_batches}
  result["perplexity" if name == "nll" else "perplexity_upper_bound"] = math.exp(min(per_token, 700.0))
  if token_bytes is not None and n_bytes:
    result["bits_per_byte"] = total / math.log(2) / n_bytes
  return result


def main(argv) -> int:
  """``python -m ardiff eval --run_dir DIR [--batches N]``: evaluate the latest checkpoint of a run."""
  import argparse

  from ardiff.training import main as train_main

  parser = argparse.ArgumentParser(prog=argv[0], description=main.__doc__)
  parser.add_argument("--checkpoint", "--run_dir", dest="run_dir", required=True,
                      help="a run directory written by `ardiff train` (or an exported params directory)")
  parser.add_argument("--batches", type=int, default=None, help="evaluation batches (default: the whole split)")
  parser.add_argument("--ema", action="store_true", help="evaluate the EMA parameters if the run keeps them")
  args = parser.parse_args(argv[1:])
  if args.batches is not None and args.batches < 1:
    parser.error(f"--batches={args.batches} must be >= 1 (omit it to evaluate the whole split).")
  result = train_main.evaluate_run(args.run_dir, max_batches=args.batches, use_ema=args.ema)
  for k, v in result.items():
    print(f"{k:>24}: {v:.6g}" if isinstance(v, float) else f"{k:>24}: {v}")
  return 0
