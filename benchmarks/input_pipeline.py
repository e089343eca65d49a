"""Input pipeline throughput: packed tokens/s per host, byte vs BPE tokenizer, at several ``data.num_threads``,
next to the default model's training tokens/s on the same machine.

    python benchmarks/input_pipeline.py                      # ~1-2 min on 2 CPU cores
    python benchmarks/input_pipeline.py --threads 1,2,4,8 --seconds 10 --bpe_vocab 8192

Each row iterates ``make_dataset`` (the embedded Shakespeare dataset, the trainer's settings: shuffled, seq_len 128,
block-aligned packing for the default BD3 B=4, batch 16, one host) for ``--seconds`` after a warm-up of a few
batches, and reports packed tokens/s (``rows * seq_len`` per second, padding included: what the model consumes) and
real tokens/s (padding excluded). The BPE tokenizer is trained here with ``ardiff data tokenizer``'s trainer on the
same corpus (a BPE covers the corpus in ~3.5x fewer tokens than bytes, so each token costs more tokenizer work). The
last column divides by the default model's training throughput (``benchmarks/train_throughput.py``'s timed step:
``configs/default.py``'s model and objective, batch 16 x 128), on the same machine, measured first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
  if p not in sys.path:
    sys.path.insert(0, p)

import numpy as np  # noqa: E402

from ardiff.data import make_dataset, shakespeare  # noqa: E402
from ardiff.data import tokenizer_train  # noqa: E402


def pipeline_rate(tokenizer: str, *, threads: int, seconds: float, batch: int, seq_len: int, block: int,
                  data_dir: str) -> tuple[float, float]:
  """``(packed tokens/s, real tokens/s)`` of one host's pipeline, after a warm-up of 3 batches."""
  cfg = {"name": "shakespeare", "data_dir": data_dir, "tokenizer": tokenizer, "num_threads": threads}
  ds, _ = make_dataset(cfg, "train", seed=0, batch_size=batch, seq_len=seq_len, block_size=block, shard_index=0,
                       shard_count=1)
  it = iter(ds)
  for _ in range(3):
    next(it)
  n = real = 0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    n += 1
    real += int(np.asarray(b["loss_mask"]).sum())
  dt = time.perf_counter() - t0
  return n * batch * seq_len / dt, real / dt


def train_tokens_per_s(batch: int, seq_len: int, steps: int) -> float:
  from configs import default
  from train_throughput import time_train_step
  from ardiff import experiment
  exp = experiment.validate(default.get_config())
  return batch * seq_len / time_train_step(exp.model, exp.objective, batch=batch, seq_len=seq_len, steps=steps)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--threads", default="1,2,4", help="data.num_threads values, comma-separated")
  p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per row")
  p.add_argument("--bpe_vocab", type=int, default=8192)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--block", type=int, default=4, help="block-aligned packing (0 = plain)")
  p.add_argument("--train_steps", type=int, default=5, help="timed steps of the model (median)")
  p.add_argument("--data_dir", default=os.path.expanduser("~/.cache/ardiff/tfds"))
  a = p.parse_args(argv)
  shakespeare.prepare(a.data_dir)

  model_rate = train_tokens_per_s(a.batch, a.seq_len, a.train_steps)
  print(f"default model (configs/default.py) training: {model_rate:,.0f} tokens/s (batch {a.batch} x {a.seq_len})")

  t0 = time.perf_counter()
  texts = [t.decode("ascii") for _, data in shakespeare.read_corpus_files() for t in shakespeare.chunk_text(data)]
  tok = tokenizer_train.train_tokenizer(texts, vocab_size=a.bpe_vocab, kind="bpe")
  tok_path = os.path.join(tempfile.mkdtemp(), "bpe.json")
  tok.save(tok_path)
  print(f"BPE: {tok.get_vocab_size()} ids trained on the corpus in {time.perf_counter() - t0:.1f} s\n")

  print(f"{'tokenizer':<10} {'threads':>7} {'packed tok/s':>13} {'real tok/s':>12} {'x model':>8}")
  for name, spec in (("byte", "byte"), ("bpe", f"hf:{tok_path}")):
    base = None
    for threads in (int(t) for t in a.threads.split(",")):
      packed, real = pipeline_rate(spec, threads=threads, seconds=a.seconds, batch=a.batch, seq_len=a.seq_len,
                                   block=a.block, data_dir=a.data_dir)
      base = base or packed
      print(f"{name:<10} {threads:>7} {packed:>13,.0f} {real:>12,.0f} {packed / model_rate:>7.1f}x"
            f"   ({packed / base:.2f}x of {a.threads.split(',')[0]} thread)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
