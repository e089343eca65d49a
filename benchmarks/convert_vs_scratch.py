"""AR -> block diffusion conversion vs training block diffusion from scratch (byte-level Shakespeare).

    python benchmarks/convert_vs_scratch.py                      # configs/ar_shakespeare.py model, ~5 min on 2 cores
    python benchmarks/convert_vs_scratch.py --seq_len 128 --ar_steps 400 --ft_steps 100     # ~17 min
    python benchmarks/convert_vs_scratch.py --block_size 8 --recipe sdar --equal_compute

The pipeline is the one docs/export.md describes, run in-process:

1. train an AR model with configs/ar_shakespeare.py for ``--ar_steps`` (its own NLL is reported);
2. export it to a Hugging Face directory (``ardiff export --to hf``) and convert that directory to a block-diffusion
   run (``ardiff convert --from-hf``, recipe ``--recipe``); its NELBO before any fine-tuning is reported too;
3. fine-tune the converted run for ``--ft_steps`` with configs/finetune.py:from=DIR (peak lr 1e-3);
4. train the same block-diffusion model and objective from scratch for the same ``--ft_steps`` (peak lr 3e-3, the
   from-scratch default of configs/default.py); with ``--equal_compute`` also for ``ar_steps + ft_steps``.

Every number is ``ardiff.training.main.evaluate_run`` on the validation split (``--eval_batches`` batches; the same
batches for every model and the same noise draws for every block-diffusion model): the NELBO for block diffusion
(an upper bound on its NLL), the exact NLL for AR; in nats per token, and in bits per byte (the sum over all
targets divided by the number of byte tokens, i.e. BOS/EOS targets are charged to the bytes).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _common(c, *, run_dir, steps, args):
  c.data.update(data_dir=args.data_dir, seq_len=args.seq_len)
  c.train.update(run_dir=run_dir, num_steps=steps, batch_size=args.batch_size, log_every=max(1, steps // 10),
                 eval_every=steps, eval_batches=2, save_every=steps, num_samples=0, resume=False)
  c.optimizer.warmup_steps = min(args.warmup, steps - 1)
  return c


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ar_steps", type=int, default=300)
  p.add_argument("--ft_steps", type=int, default=50)
  p.add_argument("--seq_len", type=int, default=64)
  p.add_argument("--block_size", type=int, default=4)
  p.add_argument("--recipe", default="fastdllm_v2", choices=("fastdllm_v2", "sdar", "bd3"))
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--eval_batches", type=int, default=16)
  p.add_argument("--equal_compute", action="store_true", help="also train from scratch for ar_steps + ft_steps")
  p.add_argument("--out", default="runs/convert_vs_scratch", help="working directory (replaced)")
  p.add_argument("--data_dir", default="~/.cache/ardiff/tfds")
  args = p.parse_args(argv)
  from ardiff import host_memory  # before JAX starts: as `python -m ardiff train` does on a CPU host
  print(f"host memory: {host_memory.keep_freed_memory()[1]}")

  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags: unparsed, they raise
    flags.FLAGS(sys.argv[:1])
  import jax

  import configs.ar_shakespeare
  import configs.finetune
  from ardiff import experiment
  from ardiff.export import convert, main as export_main
  from ardiff.training import main as train_main

  out = os.path.abspath(os.path.expanduser(args.out))
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  ev = lambda d: train_main.evaluate_run(d, max_batches=args.eval_batches)
  timings = {}

  def timed(name, fn):
    t = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - t
    print(f"[{name}: {timings[name]:.0f}s]", flush=True)
    return result

  ar_cfg = _common(configs.ar_shakespeare.get_config(), run_dir=f"{out}/ar", steps=args.ar_steps, args=args)
  model = experiment.validate(ar_cfg).model
  timed("train AR", lambda: train_main.train(ar_cfg, progress=False))
  ar = ev(f"{out}/ar")
  export_main.export_run_to_hf(f"{out}/ar", f"{out}/ar_hf")
  convert.convert_hf_to_block_diffusion(f"{out}/ar_hf", f"{out}/bd", block_size=args.block_size,
                                        recipe=args.recipe, seq_len=int(ar_cfg.data.seq_len))
  zero_shot = ev(f"{out}/bd")

  ft_cfg = _common(configs.finetune.get_config(f"from={out}/bd"), run_dir=f"{out}/ft", steps=args.ft_steps,
                   args=args)
  timed("fine-tune converted", lambda: train_main.train(ft_cfg, progress=False))
  rows = [("AR model (NLL)", args.ar_steps, ar, "nll"), ("converted, no fine-tuning", 0, zero_shot, "nelbo"),
          ("converted + fine-tuned", args.ft_steps, ev(f"{out}/ft"), "nelbo")]
  scratch_steps = [args.ft_steps] + ([args.ar_steps + args.ft_steps] if args.equal_compute else [])
  for steps in scratch_steps:
    c = _common(configs.finetune.get_config(f"from={out}/bd"), run_dir=f"{out}/scratch_{steps}", steps=steps,
                args=args)
    c.train.init_from = ""
    c.optimizer.learning_rate = experiment.base_config().optimizer.learning_rate
    timed(f"scratch {steps} steps", lambda c=c: train_main.train(c, progress=False))
    rows.append(("from scratch", steps, ev(f"{out}/scratch_{steps}"), "nelbo"))

  print(f"\nbyte-level Shakespeare, model {model.num_params() / 1e6:.2f}M params (d={model.embed_dim}, "
        f"{model.num_layers} layers), seq_len {ar_cfg.data.seq_len}, batch {args.batch_size}, block size "
        f"{args.block_size}, recipe {args.recipe}; eval: {args.eval_batches} validation batches; "
        f"{jax.devices()[0].platform} x{jax.device_count()}")
  print(f"{'model':<28}{'steps':>7}{'nats/token':>12}{'bits/byte':>11}")
  for name, steps, r, key in rows:
    print(f"{name:<28}{steps:>7}{r[f'{key}_per_token']:>12.4f}{r['bits_per_byte']:>11.4f}")
  gap = rows[3][2]["nelbo_per_token"] - rows[2][2]["nelbo_per_token"]
  print(f"scratch - converted after {args.ft_steps} steps: {gap:+.4f} nats/token "
        f"({gap / math.log(2):+.4f} bits/token)")
  print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
