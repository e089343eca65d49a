"""Issue 16's results, side by side in one run: quality per family at equal training compute, and every sampler's
tokens/forward, tokens/s, gen-PPL, entropy and word share, written to docs/results.md with a frontier plot.

    python benchmarks/results.py            # full: trains what it needs into runs/results/ (resumable: a rerun
                                            # continues unfinished runs and skips measured rows), then measures
    python benchmarks/results.py --quick    # a tiny backbone, a few dozen steps, AR + BD3 B=4 only: checks the
                                            # whole pipeline in minutes; its numbers say nothing about the goals

Families (same backbone, batch, sequence length and number of optimizer steps, i.e. the same training tokens):
AR, MDLM (one block = the whole sequence), BD3 B = 4/8/16 from scratch, BD3 B = 4 from the AR checkpoint with the
SDAR and Fast-dLLM v2 recipes (AR steps + the same number of fine-tune steps: stated in the table), TiDAR (B = 4)
from scratch and from the AR checkpoint (as the TiDAR paper starts from a pretrained AR model). DiffuSpec drafts with
the BD3 B = 4 run and with the two AR-initialised fine-tunes (the Fast-dLLM v2 one with its token shift).
Equal compute is equal training tokens; a BD3 step costs about 2x an AR step (its 2L forward over [x_t ; x_0]),
which the train-time column shows. Quality: validation NLL (AR) or NELBO (diffusion, an upper bound) per token and
its perplexity ratio to AR, on the validation split (2 plays never trained on) and on held-out English the models
never saw at all (the KJV Gospel of Mark, vendored: ardiff/data/heldout.py), BOS-led rows of data.seq_len tokens.

Samplers, each at batch 1 and 8 with the same prompts, new-token count, temperature 1 and top-p 0.9: tokens/s
(median of 3 timed calls after a compiling one) and its ratio to AR in the same run, tokens per forward (generated
tokens per row / forwards of the model that emits them; DiffuSpec and TiDAR count target forwards, the drafter's are
in the notes), gen-PPL under the AR model, mean per-sample unigram entropy (low = repetitive) and word share
(ardiff/data/word_share.py). DiffuSpec (exact) and TiDAR sample the AR law exactly; the others are approximate.
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

PROMPTS = ("ROMEO.\n", "KING HENRY.\nOnce more unto", "HAMLET.\nTo be, or not to be", "First Citizen.\n",
           "JULIET.\nO Romeo, Romeo", "MACBETH.\nIs this a dagger", "Enter", "LEAR.\nBlow, winds")
DELIMITERS = "\n.!?;:"


FROM_AR = ("sdar_b4", "fastdllm_b4", "tidar_b4_ar")  # fine-tunes of the AR run: AR steps + as many of their own


def family_configs(args) -> dict:
  """name -> experiment config, in training order (the AR run first: the fine-tunes start from it)."""
  from ardiff.cli_flags import load_config_file
  cfg = lambda spec: load_config_file(os.path.join(ROOT, "configs", spec))
  out = {"ar": cfg("ar_shakespeare.py"), "bd3_b4": cfg("bd3.py:block_size=4")}
  if not args.quick:
    out.update(mdlm=cfg("mdlm_shakespeare.py"), bd3_b8=cfg("bd3.py:block_size=8"),
               bd3_b16=cfg("bd3.py:block_size=16"), sdar_b4=cfg("finetune.py:recipe=sdar,block_size=4"),
               fastdllm_b4=cfg("finetune.py:recipe=fastdllm_v2,block_size=4"), tidar_b4=cfg("tidar_shakespeare.py"),
               bd3_b4_clip=cfg("bd3.py:block_size=4"), tidar_b4_ar=cfg("tidar_shakespeare.py"))
    # TiDAR as its paper trains it: from a pretrained AR model (here the AR run, + the same number of TiDAR steps)
    for name in ("tidar_b4", "tidar_b4_ar"):
      out[name].objective.block_size = 4
    # A quality lever measured on its own row: BD3-LM's data-driven clipped noise schedule (the [lo, lo + w] of
    # least NELBO variance, searched every eval_every steps on validation batches), else identical to bd3_b4.
    out["bd3_b4_clip"].objective.update(clip_search=True, clip_search_every=100)
  ar_dir = os.path.join(args.runs_root, "ar")
  for name, c in out.items():
    if args.quick:
      c.model.update(embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=192)
      c.data.seq_len = 64
      c.train.batch_size = 8
      c.optimizer.warmup_steps = 5
    if name == "mdlm":
      c.objective.block_size = c.data.seq_len
    c.train.update(run_dir=os.path.join(args.runs_root, name), num_steps=args.steps, num_samples=0,
                   eval_every=args.steps, save_every=args.steps, eval_batches=args.eval_batches)
    c.train.init_from = ar_dir if name in FROM_AR else ""
  return out


def train_all(args) -> dict:
  """name -> {'run_dir', 'train_s', 'eval'}; trains (or resumes) each run, times it once, evaluates it."""
  from ardiff.training.main import evaluate_run, train
  state_path = os.path.join(args.runs_root, "train_times.json")
  times = json.load(open(state_path)) if os.path.exists(state_path) else {}
  out = {}
  for name, c in family_configs(args).items():
    if name not in times:
      print(f"training {name} ({c.train.num_steps} steps) into {c.train.run_dir} ...", flush=True)
      t0 = time.perf_counter()
      train(c, progress=True)
      times[name] = time.perf_counter() - t0
      os.makedirs(args.runs_root, exist_ok=True)
      json.dump(times, open(state_path, "w"), indent=1)
    ev = evaluate_run(c.train.run_dir, max_batches=args.eval_batches)
    metric = "nll_per_token" if "nll_per_token" in ev else "nelbo_per_token"
    out[name] = dict(run_dir=c.train.run_dir, train_s=times[name], loss=float(ev[metric]),
                     metric="NLL" if "nll" in metric else "NELBO", heldout=heldout_loss(c.train.run_dir, args))
  return out


def heldout_loss(run_dir, args) -> float:
  """NLL (AR, TiDAR) or NELBO per token of the run on the held-out English text (ardiff/data/heldout.py)."""
  import jax

  from ardiff import data as data_lib
  from ardiff.data.heldout import heldout_batches
  from ardiff.training import evaluate as evaluate_lib
  from ardiff.training.main import load_run
  exp, model, params = load_run(run_dir)
  batches = heldout_batches(data_lib.make_tokenizer(exp.data.tokenizer), seq_len=exp.data.seq_len,
                            batch_size=exp.train.batch_size)
  ev = evaluate_lib.evaluate(params, batches, model=model, objective=exp.objective, rng=jax.random.key(0),
                             max_batches=args.eval_batches)
  return float(ev["nll_per_token"] if "nll_per_token" in ev else ev["nelbo_per_token"])


LEVERS = ("bd3_b4_clip",)  # runs that differ from bd3_b4 by one training lever


def sampler_settings(runs: dict) -> list:
  """(row name, sampler, model run, drafter run or None, options)."""
  rows = [("AR", "ar", "ar", None, {})]
  for name in runs:
    if name in LEVERS:  # a quality lever: its default sampler only (the sampler settings are compared on bd3_b4)
      rows.append((f"{name} top-1 confidence", "block_diffusion", name, None, dict(strategy="topk_confidence")))
    elif name.startswith(("bd3", "mdlm", "sdar", "fastdllm")):
      rows += [(f"{name} top-1 confidence", "block_diffusion", name, None, dict(strategy="topk_confidence")),
               (f"{name} threshold 0.9", "block_diffusion", name, None, dict(strategy="threshold", threshold=0.9)),
               (f"{name} threshold 0.5", "block_diffusion", name, None, dict(strategy="threshold", threshold=0.5))]
  rows.append(("bd3_b4 threshold 0.5 + AdaBlock ends", "block_diffusion", "bd3_b4", None,
               dict(strategy="threshold", threshold=0.5, delimiters=tuple(DELIMITERS.encode()),
                    delimiter_threshold=0.5)))
  if "tidar_b4" in runs:
    rows.append(("TiDAR B=4", "tidar", "tidar_b4", None, {}))
  if "tidar_b4_ar" in runs:
    rows.append(("TiDAR B=4, from AR", "tidar", "tidar_b4_ar", None, {}))
  for k, s in ((4, 1), (4, 2), (8, 2)):
    rows.append((f"DiffuSpec k={k} S={s} (exact)", "diffuspec", "ar", "bd3_b4", dict(num_draft=k, draft_steps=s)))
  for drafter in ("sdar_b4", "fastdllm_b4"):  # AR-initialised drafters: closer to the target's law
    if drafter in runs:
      for k, s in ((4, 1), (4, 2), (8, 2)):
        rows.append((f"DiffuSpec k={k} S={s}, {drafter} drafter (exact)", "diffuspec", "ar", drafter,
                     dict(num_draft=k, draft_steps=s)))
  rows.append(("DiffuSpec k=4 S=1, FreeCache guide 0.3 (lossy)", "diffuspec", "ar", "bd3_b4",
               dict(num_draft=4, draft_steps=1, guide=0.3)))
  return rows


def setting_inputs(loaded: dict, which: str, drafter, options: dict) -> tuple:
  """``(exp, model, params, draft, block_size, options)`` for :func:`~ardiff.sampling.generate.generate` from the
  loaded runs (``name -> (exp, model, params)``): a drafter run gives ``draft``, its block size and its token shift."""
  exp, model, params = loaded[which]
  if not drafter:
    return exp, model, params, None, None, options
  dexp, dmodel, dparams = loaded[drafter]
  return (exp, model, params, (dparams, dmodel), dexp.objective.block_size,
          dict(options, draft_token_shift=bool(dexp.objective.token_shift)))


def measure(args, runs: dict) -> list:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ardiff import data as data_lib
  from ardiff import masks as masks_lib
  from ardiff.data.word_share import shakespeare_vocabulary, word_share
  from ardiff.sampling.common import remove_mask_logit
  from ardiff.sampling.generate import encode_prompt, generate
  from ardiff.training.main import load_run

  cache_path = os.path.join(args.runs_root, "samplers.json")
  done = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
  loaded = {name: load_run(r["run_dir"]) for name, r in runs.items()}
  tok = data_lib.make_tokenizer("byte")
  vocab = shakespeare_vocabulary()
  _, ar_model, ar_params = loaded["ar"]
  ar_fwd = jax.jit(lambda p_, t: ar_model.apply({"params": p_}, t, mask=masks_lib.Causal()).logits)
  rows = []
  for batch in (1, 8):
    ids = [encode_prompt(tok, PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    width = max(len(x) for x in ids)
    prompt = np.zeros((batch, width), np.int32)
    for r, x in enumerate(ids):
      prompt[r, :len(x)] = x
    lens = np.asarray([len(x) for x in ids], np.int32)
    for label, sampler, which, drafter, options in sampler_settings(runs):
      key = f"{label} | batch {batch}"
      if key in done:
        rows.append(done[key])
        continue
      exp, model, params, draft, block_size, options = setting_inputs(loaded, which, drafter, options)
      fn = lambda: generate(sampler, params, model, prompt, lens, rng=jax.random.key(0), num_tokens=args.new_tokens,
                            objective=exp.objective, block_size=block_size, draft=draft, temperature=1.0,
                            top_p=0.9, eos_id=None, **options)
      jax.block_until_ready(fn().tokens)  # compile
      secs = []
      for _ in range(3):
        t0 = time.perf_counter()
        res = fn()
        jax.block_until_ready(res.tokens)
        secs.append(time.perf_counter() - t0)
      toks, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
      seq = np.zeros((batch, width + toks.shape[1]), np.int32)
      for r in range(batch):
        seq[r, :lens[r]] = prompt[r, :lens[r]]
        seq[r, lens[r]:lens[r] + toks.shape[1]] = toks[r]
      lp = np.asarray(jax.nn.log_softmax(remove_mask_logit(ar_fwd(ar_params, jnp.asarray(seq)),
                                                           ar_model.config.mask_token_id), -1))
      nll, ent, texts = [], [], []
      for r in range(batch):
        gen = toks[r, :lengths[r]]
        nll.extend(-lp[r, lens[r] - 1 + np.arange(len(gen)), gen])
        q = np.bincount(gen).astype(np.float64)
        q = q[q > 0] / q.sum()
        ent.append(float(-(q * np.log(q)).sum()))
        texts.append(tok.decode([int(t) for t in gen]))
      notes = ""
      if hasattr(res, "accepted"):
        notes = f"accepted {float(np.mean(res.accepted)) / max(int(res.steps), 1):.2f} drafts/step"
      if hasattr(res, "draft_nfe"):
        notes += f", drafter forwards {int(res.draft_nfe)}"
      row = dict(sampler=label, batch=batch, seconds=sorted(secs)[1], new_tokens=int(lengths.sum()),
                 tokens_per_s=float(lengths.sum() / sorted(secs)[1]), nfe=int(res.nfe),
                 tokens_per_forward=float(lengths.max() / int(res.nfe)), gen_ppl=float(np.exp(np.mean(nll))),
                 entropy=float(np.mean(ent)), word_share=word_share(texts, vocab)[0], notes=notes,
                 sample=texts[0][:160])
      done[key] = row
      json.dump(done, open(cache_path, "w"), indent=1)
      rows.append(row)
      print(f"  {key}: {row['tokens_per_s']:.1f} tok/s, {row['tokens_per_forward']:.2f} tok/fwd, gen-PPL "
            f"{row['gen_ppl']:.2f}", flush=True)
  return rows


def plot_frontier(rows, path):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ar = next(r for r in rows if r["sampler"] == "AR" and r["batch"] == 1)
  colors = {}
  for r in (r for r in rows if r["batch"] == 1):
    family = r["sampler"].split(" ")[0]
    color = colors.setdefault(family, f"C{len(colors)}")  # one colour per family, as the legend shows
    ax.scatter(r["tokens_per_s"] / ar["tokens_per_s"], r["gen_ppl"], label=family, s=18, color=color)
    ax.annotate(r["sampler"], (r["tokens_per_s"] / ar["tokens_per_s"], r["gen_ppl"]), fontsize=5)
  handles, labels = ax.get_legend_handles_labels()
  uniq = dict(zip(labels, handles))
  ax.legend(uniq.values(), uniq.keys(), fontsize=6)
  ax.set_xlabel("tokens/s relative to AR (batch 1)")
  ax.set_ylabel("gen-PPL under the AR model (lower is better)")
  ax.set_title("quality vs speed per sampler")
  fig.tight_layout()
  fig.savefig(path, dpi=150)


def goals(runs, rows, *, see_also: bool = False) -> list:
  """The issue's goals against this run's figures (met / not met, with the measured number); ``see_also`` adds a
  pointer to the kept "What stands in the way" section."""
  import math
  out = ["## Goals (this run)", ""]
  if "bd3_b4" in runs:
    ratio = math.exp(runs["bd3_b4"]["loss"] - runs["ar"]["loss"])
    out.append(f"- BD3 B=4 perplexity <= 1.15x AR (validation): {ratio:.2f}x, "
               f"{'met' if ratio <= 1.15 else 'NOT met'} (NELBO bound vs NLL).")
    if "heldout" in runs["bd3_b4"]:
      ratio = math.exp(runs["bd3_b4"]["heldout"] - runs["ar"]["heldout"])
      out.append(f"- BD3 B=4 perplexity <= 1.15x AR (held-out English): {ratio:.2f}x, "
                 f"{'met' if ratio <= 1.15 else 'NOT met'} (NELBO bound vs NLL).")
  b1 = [r for r in rows if r["batch"] == 1]
  ar = next(r for r in b1 if r["sampler"] == "AR")
  # Speed at batch 1, quality from the same setting's batch-8 samples (8x the tokens: one batch-1 sample's gen-PPL
  # moves by tens of percent from seed to seed, even for the exact samplers whose law is the AR model's).
  ppl8 = {r["sampler"]: r["gen_ppl"] for r in rows if r["batch"] == 8}
  fast = [r for r in b1 if r["tokens_per_forward"] >= 2 and r["tokens_per_s"] >= 1.5 * ar["tokens_per_s"]
          and ppl8.get(r["sampler"], float("inf")) <= 1.1 * ppl8["AR"]]
  near = [f"{r['sampler']} ({r['tokens_per_forward']:.2f} tokens/forward, {r['tokens_per_s'] / ar['tokens_per_s']:.2f}x"
          f" AR tokens/s, gen-PPL {ppl8.get(r['sampler'], float('nan')) / ppl8['AR']:.2f}x AR's)"
          for r in b1 if r["tokens_per_forward"] >= 2]
  out.append("- a setting with >= 2 tokens/forward and >= 1.5x AR tokens/s at batch 1, gen-PPL (batch 8) within 10% "
             "of AR's: " + (", ".join(r["sampler"] for r in fast) + ": met" if fast else "NOT met")
             + (f"; settings at >= 2 tokens/forward: {'; '.join(near)}" if near else ""))
  for fam in ("TiDAR", "DiffuSpec"):
    exact = [r for r in b1 if r["sampler"].startswith(fam) and "lossy" not in r["sampler"]]
    if exact:
      best = max(exact, key=lambda r: r["tokens_per_forward"])
      out.append(f"- {fam} (exact) tokens/forward >= 2.5: best {best['tokens_per_forward']:.2f} ({best['sampler']}), "
                 f"{'met' if best['tokens_per_forward'] >= 2.5 else 'NOT met'}.")
  if see_also:
    out.append("- What stands in the way of the goals not met: the section of that name below (measured by "
               "benchmarks/tidar_ceiling.py, benchmarks/acceptance_vs_temperature.py and benchmarks/forward_cost.py).")
  return out + [""]


def write_markdown(args, runs, rows, path, plot_name):
  import jax
  ar = runs["ar"]
  mode = ("QUICK RUN: `--quick`, a tiny backbone and a few steps; it checks the pipeline, NOT the issue's goals"
          if args.quick else "full run")
  lines = [f"# Results: {mode}", "",
           f"Written by `python benchmarks/results.py{' --quick' if args.quick else ''}` on "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {jax.devices()[0].device_kind} "
           f"({jax.default_backend()}). {args.note}".rstrip(), "",
           f"## Quality at equal training compute ({args.steps} steps each; fine-tunes: + {args.steps} AR steps)", "",
           "| family | metric | nats/token | perplexity | ratio to AR | held-out nats/token | held-out ratio to AR | "
           "train time (s) |", "|---|---|---|---|---|---|---|---|"]
  exp_ = __import__("math").exp
  for name, r in runs.items():
    lines.append(f"| {name} | {r['metric']} | {r['loss']:.3f} | {exp_(r['loss']):.2f} | "
                 f"{exp_(r['loss'] - ar['loss']):.2f}x | {r['heldout']:.3f} | {exp_(r['heldout'] - ar['heldout']):.2f}x"
                 f" | {r['train_s']:.0f} |")
  lines += ["", "NELBO is an upper bound on the NLL, so ratios overstate the diffusion families' gap. Validation: the "
            "corpus's 2 held-back plays; held-out: the KJV Gospel of Mark (ardiff/data/heldout.py), English the models "
            "never saw.", ""]
  for batch in (1, 8):
    ar_row = next(r for r in rows if r["sampler"] == "AR" and r["batch"] == batch)
    lines += [f"## Samplers, batch {batch} ({args.new_tokens} new tokens per row)", "",
              "| sampler | tokens/s | x AR | tokens/forward | NFE | gen-PPL | entropy | word share | notes |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["batch"] == batch):
      lines.append(f"| {r['sampler']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / ar_row['tokens_per_s']:.2f} | "
                   f"{r['tokens_per_forward']:.2f} | {r['nfe']} | {r['gen_ppl']:.2f} | {r['entropy']:.2f} | "
                   f"{r['word_share']:.0%} | {r['notes']} |")
    lines.append("")
  kept = kept_sections(path)
  see_also = any(k.startswith("## What stands in the way") for k in kept)
  lines += ([f"![quality vs speed]({plot_name})", ""] + goals(runs, rows, see_also=see_also)
            + ["## Samples (batch 1, first 160 characters)", ""])
  for r in (r for r in rows if r["batch"] == 1):
    lines.append(f"- **{r['sampler']}**: `{r['sample']!r}`")
  lines += kept
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


KEPT = ("## Default run", "## Confidence distillation", "## What stands in the way")  # measured by other scripts:
# default_run.py, distill.py, tidar_ceiling.py, acceptance_vs_temperature.py and forward_cost.py


def kept_sections(path) -> list:
  """The sections of an existing results file that other benchmarks measured (``KEPT``), carried over verbatim so
  a rerun of this script does not drop them."""
  if not os.path.exists(path):
    return []
  out, keep = [], False
  for line in open(path).read().splitlines():
    if line.startswith("## "):
      keep = line.startswith(KEPT)
    if keep:
      out.append(line)
  return [""] + out if out else []


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny backbone, AR + BD3 B=4, few steps (pipeline check)")
  p.add_argument("--runs_root", default=None, help="default: runs/results (runs/results_quick with --quick)")
  p.add_argument("--steps", type=int, default=None, help="optimizer steps per family (default 400; quick 40)")
  p.add_argument("--eval_batches", type=int, default=None, help="validation batches (default 20; quick 4)")
  p.add_argument("--new_tokens", type=int, default=None, help="new tokens per row (default 128; quick 32)")
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "results.md"))
  p.add_argument("--note", default="", help="a sentence added under the title (e.g. the machine's load)")
  args = p.parse_args(argv)
  from ardiff import host_memory  # before JAX starts: as `python -m ardiff train` does on a CPU host
  print(f"host memory: {host_memory.keep_freed_memory()[1]}")
  q = args.quick
  args.runs_root = args.runs_root or os.path.join(ROOT, "runs", "results_quick" if q else "results")
  args.steps = args.steps or (40 if q else 400)
  args.eval_batches = args.eval_batches or (4 if q else 20)
  args.new_tokens = args.new_tokens or (32 if q else 128)
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags: unparsed, they raise
    flags.FLAGS(sys.argv[:1])
  runs = train_all(args)
  rows = measure(args, runs)
  plot_name = os.path.splitext(os.path.basename(args.out))[0] + "_frontier.png"
  plot_frontier(rows, os.path.join(os.path.dirname(args.out), plot_name))
  write_markdown(args, runs, rows, args.out, plot_name)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
