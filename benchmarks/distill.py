"""Confidence distillation measured: a block-diffusion student's tokens/forward vs gen-PPL (under its AR teacher)
before and after fine-tuning on the teacher's own samples (ardiff/training/distill.py).

    python benchmarks/distill.py --teacher runs/results/ar --student runs/results/bd3_b4 [--steps 200]

The teacher draws ``--samples`` continuations of BOS (temperature 1, top-p 1, seed 0) filling the student's context;
the student is fine-tuned ``--steps`` AdamW steps on them. Each student is then decoded with the Fast-dLLM threshold
rule (and top-1 confidence) at batch 8 on results.py's prompts, ``--new_tokens`` tokens, temperature 1 / top-p 0.9;
tokens/forward = generated tokens per row / student forwards, gen-PPL = exp(mean NLL of the generated tokens under
the teacher), word share as in samples.txt. Prints a markdown table (``--json`` writes the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

SETTINGS = (("top-1 confidence", dict(strategy="topk_confidence")),
            ("threshold 0.9", dict(strategy="threshold", threshold=0.9)),
            ("threshold 0.7", dict(strategy="threshold", threshold=0.7)))


def decode_rows(label, params, model, exp, teacher, tok, args):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ardiff import masks as masks_lib
  from ardiff.data.word_share import shakespeare_vocabulary, word_share
  from ardiff.sampling.common import remove_mask_logit
  from ardiff.sampling.generate import encode_prompt, generate
  from results import PROMPTS

  t_model, t_params = teacher
  ids = [encode_prompt(tok, PROMPTS[i % len(PROMPTS)]) for i in range(8)]
  width = max(len(x) for x in ids)
  prompt = np.zeros((8, width), np.int32)
  for r, x in enumerate(ids):
    prompt[r, :len(x)] = x
  lens = np.asarray([len(x) for x in ids], np.int32)
  rows = []
  for name, options in SETTINGS:
    res = generate("block_diffusion", params, model, prompt, lens, rng=jax.random.key(0), num_tokens=args.new_tokens,
                   objective=exp.objective, temperature=1.0, top_p=0.9, **options)
    toks, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
    seq = np.zeros((8, width + toks.shape[1]), np.int32)
    for r in range(8):
      seq[r, :lens[r]] = prompt[r, :lens[r]]
      seq[r, lens[r]:lens[r] + toks.shape[1]] = toks[r]
    logits = t_model.apply({"params": t_params}, jnp.asarray(seq), mask=masks_lib.Causal()).logits
    lp = np.asarray(jax.nn.log_softmax(remove_mask_logit(logits, t_model.config.mask_token_id), -1))
    nll = [-lp[r, lens[r] - 1 + i, toks[r, i]] for r in range(8) for i in range(int(lengths[r]))]
    texts = [tok.decode([int(t) for t in toks[r, :lengths[r]]]) for r in range(8)]
    rows.append(dict(student=label, sampler=name, tokens_per_forward=float(lengths.max() / int(res.nfe)),
                     nfe=int(res.nfe), gen_ppl=float(np.exp(np.mean(nll))),
                     word_share=word_share(texts, shakespeare_vocabulary())[0], sample=texts[0][:80]))
    print(f"  {label} / {name}: {rows[-1]['tokens_per_forward']:.2f} tok/fwd, gen-PPL {rows[-1]['gen_ppl']:.2f}",
          flush=True)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--teacher", required=True, help="an AR run directory")
  p.add_argument("--student", required=True, help="a block-diffusion run directory (same tokenizer)")
  p.add_argument("--samples", type=int, default=256, help="teacher samples to fine-tune on")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--learning_rate", type=float, default=3e-4)
  p.add_argument("--certainty_weight", type=float, default=0.5)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  from ardiff import host_memory  # before JAX starts: as `python -m ardiff train` does on a CPU host
  print(f"host memory: {host_memory.keep_freed_memory()[1]}")

  import jax
  import numpy as np

  from ardiff import data as data_lib
  from ardiff.training import distill
  from ardiff.training.main import load_run

  t_exp, t_model, t_params = load_run(args.teacher)
  s_exp, s_model, s_params = load_run(args.student)
  if t_exp.data.tokenizer != s_exp.data.tokenizer:
    raise SystemExit(f"error: teacher tokenizer {t_exp.data.tokenizer!r} != student's {s_exp.data.tokenizer!r}.")
  tok = data_lib.make_tokenizer(s_exp.data.tokenizer)
  length = s_exp.data.seq_len
  t0 = time.perf_counter()
  bos = np.full((args.samples, 1), tok.bos_id, np.int32)
  data = distill.teacher_samples(t_params, t_model, bos, np.ones(args.samples, np.int32), rng=jax.random.key(0),
                                 num_tokens=length - 1)
  t_gen = time.perf_counter() - t0
  rows = decode_rows("before", s_params, s_model, s_exp, (t_model, t_params), tok, args)
  t0 = time.perf_counter()
  tuned, hist = distill.finetune(s_params, s_model, s_exp.objective, data, steps=args.steps,
                                 batch_size=args.batch_size, learning_rate=args.learning_rate,
                                 certainty_weight=args.certainty_weight)
  t_ft = time.perf_counter() - t0
  rows += decode_rows("after", tuned, s_model, s_exp, (t_model, t_params), tok, args)
  first, last = hist[0], hist[-1]
  print(f"\nteacher: {args.teacher}; student: {args.student} ({s_exp.model.num_layers} layers x "
        f"{s_exp.model.embed_dim}, B={s_exp.objective.block_size}, context {length}). {args.samples} teacher samples "
        f"of {length - 1} tokens ({t_gen:.0f} s); {args.steps} steps x batch {args.batch_size}, lr "
        f"{args.learning_rate}, certainty weight {args.certainty_weight} ({t_ft:.0f} s): ce {first['ce']:.3f} -> "
        f"{last['ce']:.3f}, certainty {first['certainty']:.3f} -> {last['certainty']:.3f}.\n")
  print("| student | sampler | tokens/forward | NFE | gen-PPL | word share |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['student']} | {r['sampler']} | {r['tokens_per_forward']:.2f} | {r['nfe']} | {r['gen_ppl']:.2f} | "
          f"{r['word_share']:.0%} |")
  if args.json:
    json.dump(dict(rows=rows, first=first, last=last, args=vars(args)), open(args.json, "w"), indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
