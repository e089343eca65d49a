"""``ardiff data show``: the packed rows a config trains on, decoded back to text, with segment and block
boundaries, the loss mask, and the packing efficiency (share of non-padding tokens).

For each row it prints a token map, one character per token (wrapped every 64 tokens): the segment id (``1``-``9``,
then ``a``-``z``, ``+`` beyond), ``.`` for padding, and ``|`` at every block boundary of block diffusion; below it the
loss mask (``1`` = the token is trained on), then each segment decoded (BOS/EOS dropped, marked in its header).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["describe_row", "token_map", "packing_efficiency", "show", "main"]

_DIGITS = "123456789abcdefghijklmnopqrstuvwxyz"


def token_map(values, block_size: int, char) -> str:
  """One character per position (``char(value)``), ``|`` before each block boundary after the first."""
  out = []
  for i, v in enumerate(values):
    if block_size and i and i % block_size == 0:
      out.append("|")
    out.append(char(int(v)))
  return "".join(out)


def describe_row(tokens, segment_ids, tok) -> list[dict]:
  """The segments of one packed row ``[L]``: ``{id, start, end, text, bos, eos}`` (``end`` exclusive)."""
  tokens, segment_ids = np.asarray(tokens), np.asarray(segment_ids)
  out = []
  for sid in [int(s) for s in dict.fromkeys(segment_ids.tolist()) if s != 0]:
    where = np.flatnonzero(segment_ids == sid)
    ids = tokens[where]
    out.append({"id": sid, "start": int(where[0]), "end": int(where[-1]) + 1, "text": tok.decode(ids),
                "bos": bool(ids[0] == tok.bos_id), "eos": bool(ids[-1] == tok.eos_id)})
  return out


def packing_efficiency(batches) -> float:
  """Share of non-padding tokens over ``batches`` (dicts with ``loss_mask`` ``[b, L]``)."""
  real = total = 0
  for b in batches:
    m = np.asarray(b["loss_mask"])
    real, total = real + int(m.sum()), total + m.size
  return real / max(total, 1)


def _wrap(label: str, line: str, width: int) -> list[str]:
  parts, cur, count = [], "", 0
  for c in line:
    cur += c
    count += c != "|"
    if count == width:
      parts.append(cur)
      cur, count = "", 0
  if cur:
    parts.append(cur)
  return [f"  {label if i == 0 else '':<10}{p}" for i, p in enumerate(parts)]


def format_row(index: int, batch: dict, tok, block_size: int, width: int = 64) -> str:
  seg, mask = np.asarray(batch["segment_ids"][index]), np.asarray(batch["loss_mask"][index])
  segments = describe_row(batch["tokens"][index], seg, tok)
  lines = [f"row {index}: {len(segments)} segment{'s' if len(segments) != 1 else ''}, {int(mask.sum())}/{mask.size} real tokens "
           f"({mask.mean():.1%})"]
  lines += _wrap("segments", token_map(seg, block_size, lambda s: "." if s == 0 else (_DIGITS + "+")[min(s, 36) - 1]),
                 width)
  lines += _wrap("loss mask", token_map(mask, block_size, str), width)
  for s in segments:
    ends = ("BOS " if s["bos"] else "") + ("... EOS" if s["eos"] else "... (continues in another chunk)")
    lines.append(f"  --- segment {s['id']}: tokens {s['start']}-{s['end'] - 1}, {ends} ---")
    lines.append(s["text"])
  return "\n".join(lines)


def show(config, *, n: int = 3, split: str | None = None, stats_batches: int = 16) -> dict:
  """Prints ``n`` packed rows of ``config`` (a ConfigDict) and the packing efficiency; returns what it printed."""
  from ardiff.config import ModelConfig
  from ardiff.data.pipeline import make_dataset
  from ardiff.objectives.base import ObjectiveConfig
  from ardiff.sections import DataConfig, TrainConfig

  data = DataConfig.from_dict(config.data.to_dict())
  objective = ObjectiveConfig.from_dict(config.objective.to_dict())
  model = ModelConfig.from_dict(config.model.to_dict())
  seed = TrainConfig.from_dict(config.train.to_dict()).seed
  block = objective.block_size if objective.kind in ("block_diffusion", "tidar") else 0
  split = split or data.train_split
  ds, tok = make_dataset(data.replace(data_dir=os.path.expanduser(data.data_dir)), split, seed=seed, batch_size=n,
                         block_size=block, shard_index=0, shard_count=1)
  if tok.vocab_size > model.vocab_size:  # the trainer stops here at load; say so next to the rows that show it
    print(f"warning: data.tokenizer has {tok.vocab_size} ids but model.vocab_size={model.vocab_size}; training "
          f"stops until --config.model.vocab_size={tok.vocab_size}.")
  it = iter(ds)
  first = next(it)
  batches = [first] + [next(it) for _ in range(max(stats_batches - 1, 0))]
  eff = packing_efficiency(batches)
  print(f"{data.name} [{split}], tokenizer {data.tokenizer} ({tok.vocab_size} ids), seq_len {data.seq_len}"
        + (f", block size {block} (| marks block boundaries)" if block else "") + "\n")
  for i in range(n):
    print(format_row(i, first, tok, block) + "\n")
  rows = sum(np.asarray(b["loss_mask"]).shape[0] for b in batches)
  print(f"packing efficiency: {eff:.1%} of tokens are real (not padding) over {rows} rows")
  return {"batch": first, "efficiency": eff, "tokenizer": tok}


def main(argv) -> int:
  """``ardiff data show [--config FILE[:ARG]] [--config.SECTION.KEY=VALUE ...] [--n 3] [--split SPLIT]``."""
  from ardiff import cli_flags
  flags = (cli_flags.Flag("n", 3, "rows to print", int),
           cli_flags.Flag("split", "", "split to read (default: data.train_split)"),
           cli_flags.Flag("stats_batches", 16, "batches the packing efficiency is measured over", int))
  parsed = cli_flags.parse(argv, description=__doc__, default_config=os.path.join(cli_flags.CONFIGS_DIR, "default.py"),
                           flags=flags)
  if parsed is None:
    return 0
  config, values = parsed
  if values["n"] < 1 or values["stats_batches"] < 1:
    raise ValueError(f"--n={values['n']} and --stats_batches={values['stats_batches']} must be >= 1.")
  show(config, n=values["n"], split=values["split"] or None, stats_batches=values["stats_batches"])
  return 0
