"""``python -m ardiff sample --checkpoint DIR --prompt TEXT [--sampler ...]``: generate from a trained run (or an
exported params directory); prints the samples, then one line of figures.

    python -m ardiff sample --checkpoint runs/default --prompt "ROMEO." --strategy threshold --threshold 0.9
    python -m ardiff sample --checkpoint runs/tidar_shakespeare --sampler tidar
    python -m ardiff sample --checkpoint runs/ar_shakespeare --sampler speculative --draft_checkpoint runs/ar_small
    python -m ardiff sample --checkpoint runs/ar_shakespeare --sampler diffuspec --draft_checkpoint runs/default_byte

The prompt plus the new tokens must fit in the model's context, the run's data.seq_len (BOS included): a longer
prompt is an error unless --truncate_prompt N keeps its last N tokens (a note says so). The byte tokenizer takes the
prompt's raw bytes (any bytes, not only UTF-8); other tokenizers need UTF-8 text.

By default the sampler runs twice: an untimed warm-up generation that compiles, then the timed one (--no-warmup:
once, timed with its compilation). The figures: samples, new_tokens_total (new tokens of all samples together),
time, tokens_per_s_total (all samples), NFE (model forwards; each forward serves every sample), and per sample
new_tokens_per_sample (the longest sample's) and tokens_per_forward_per_sample (that length / NFE).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from ardiff.errors import UsageError
from ardiff.sampling import family_defaults
from ardiff.sampling.block_diffusion import KV_WRITES, STRATEGIES
from ardiff.sampling.generate import DEFAULT_PROMPT, SAMPLERS, default_sampler, encode_prompt, generate


def parse_args(argv):
  p = argparse.ArgumentParser(prog=argv[0], description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--checkpoint", "--run_dir", dest="run_dir", required=True,
                 help="a run directory of `ardiff train`, or a params directory of `ardiff export --to params`")
  p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text (its raw bytes with the byte tokenizer)")
  p.add_argument("--truncate_prompt", type=int, default=None, metavar="N",
                 help="keep only the last N prompt tokens (BOS stays first and counts) when the prompt is longer")
  p.add_argument("--sampler", choices=("auto",) + SAMPLERS, default="auto",
                 help="auto: the family the run was trained as (block diffusion, TiDAR draft+verify, or AR)")
  p.add_argument("--num_tokens", type=int, default=None,
                 help="new tokens per sample (default: the rest of the context, data.seq_len - prompt tokens)")
  p.add_argument("--num_samples", type=int, default=None,
                 help="samples (default 1); image runs: per class (default: the run's train.num_samples)")
  p.add_argument("--chat", default=None, metavar="QUESTION",
                 help="a user turn rendered with the model's chat template (tokenizer_config.json); generation "
                      "stops at the template's end token. Replaces --prompt")
  p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the run's, else 1.0)")
  p.add_argument("--top_p", type=float, default=None, help="default: the run's, else 0.9")
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ema", action="store_true", help="sample with the EMA parameters")
  p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                 help="generate once untimed (compiles) before the timed generation; --no-warmup times one "
                      "generation, compilation included")
  bd = p.add_argument_group("block diffusion")
  bd.add_argument("--block_size", type=int, default=None, help="default: the run's objective.block_size")
  bd.add_argument("--strategy", choices=STRATEGIES, default=None,
                  help="unmasking rule (default: an imported family's, else threshold)")
  bd.add_argument("--threshold", type=float, default=None, help="τ of threshold / dynamic (default 0.9)")
  bd.add_argument("--steps_per_block", type=int, default=None, help="k = ceil(B/steps) for static rules")
  bd.add_argument("--sub_block_size", type=int, default=None, help="Fast-dLLM v2 sub-blocks")
  bd.add_argument("--kv_write", choices=KV_WRITES, default="fused", help="clean-block K/V write")
  bd.add_argument("--delimiters", default=None, metavar="TEXT",
                  help="AdaBlock-style adaptive block end: a step's commits stop at the first position predicted as "
                       "one of these characters (tokenized), e.g. $'\\n.!?'")
  bd.add_argument("--delimiter_threshold", type=float, default=0.9, help="confidence a delimiter needs")
  img = p.add_argument_group("images (runs with an image section write a PNG grid; --num_samples is per class)")
  img.add_argument("--cfg_scale", type=float, default=None,
                   help="continuous image runs: guidance scale (default: the run's image.cfg_scale; 1 = none)")
  img.add_argument("--out", default=None, help="image runs: the PNG to write (default: RUN/samples.png)")
  spec = p.add_argument_group("speculative decoding")
  spec.add_argument("--draft_checkpoint", default=None,
                    help="the drafter (same tokenizer): a small AR run (speculative) or a block-diffusion run "
                         "(diffuspec)")
  spec.add_argument("--num_draft", type=int, default=4, help="drafted tokens per step")
  spec.add_argument("--draft_steps", type=int, default=1,
                    help="diffuspec: drafter forwards per step (slots filled left to right, 1..num_draft)")
  spec.add_argument("--guide", type=float, default=None, metavar="TAU",
                    help="diffuspec: FreeCache-style AR-guided acceptance (LOSSY): keep drafts with p >= TAU * max p")
  return p.parse_args(argv[1:])


def prompt_input(tok, text: str):
  """What the tokenizer encodes for a command-line prompt: raw bytes for the byte tokenizer (Python decodes argv
  with surrogateescape, ``os.fsencode`` gives the bytes back), UTF-8 text for the others."""
  from ardiff.data.tokenizers import ByteTokenizer
  if isinstance(tok, ByteTokenizer):
    return os.fsencode(text)
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise UsageError(f"--prompt is not valid UTF-8 (undecodable byte at character {e.start}: "
                     f"{os.fsencode(text[e.start:e.end])!r}) and the tokenizer {tok!r} reads text; give a UTF-8 "
                     "prompt.") from None
  return text


def fit_prompt(ids: list, *, context: int, num_tokens, truncate, bos_id):
  """``(ids, num_tokens, note)``: the prompt and new-token count checked against the model's ``context``.

  A prompt that leaves no room is an error, unless ``truncate = N`` keeps its last N tokens (BOS stays first).
  ``num_tokens=None`` fills the context.
  """
  note = None
  if truncate is not None:
    if not 1 <= truncate < context:
      raise UsageError(f"--truncate_prompt={truncate} must lie in [1, {context - 1}] (the context is {context} "
                       "tokens, and at least one new token needs room).")
    if len(ids) > truncate:
      head = [ids[0]] if bos_id is not None and ids[0] == bos_id else []
      kept = head + ids[len(ids) - (truncate - len(head)):]
      note = (f"note: --truncate_prompt={truncate}: the prompt has {len(ids)} tokens; kept "
              + ("BOS and " if head else "") + f"its last {truncate - len(head)}.")
      ids = kept
  room = context - len(ids)
  if room < 1:
    raise UsageError(f"the prompt is {len(ids)} tokens (BOS included) but the model's context is {context} tokens "
                     f"(the run's data.seq_len), leaving no room for new tokens; shorten the prompt, or pass "
                     f"--truncate_prompt N (N < {context}) to keep its last N tokens.")
  if num_tokens is None:
    num_tokens = room
  if num_tokens < 1:
    raise UsageError(f"--num_tokens={num_tokens} must be >= 1.")
  if len(ids) + num_tokens > context:
    raise UsageError(f"the prompt ({len(ids)} tokens, BOS included) plus --num_tokens={num_tokens} is "
                     f"{len(ids) + num_tokens} tokens, more than the model's context of {context} (the run's "
                     f"data.seq_len); lower --num_tokens to at most {room}, shorten the prompt, or pass "
                     f"--truncate_prompt N to keep its last N tokens.")
  return ids, num_tokens, note


def main(argv) -> int:
  from ardiff import data as data_lib
  from ardiff.checkpoints.run_dir import load_run

  args = parse_args(argv)
  if args.num_samples is not None and args.num_samples < 1:
    raise UsageError(f"--num_samples={args.num_samples} must be >= 1.")
  from ardiff.images import main as images_main
  if images_main.is_image_run(args.run_dir):  # image runs: a PNG grid (ardiff/images/main.py)
    from ardiff.sampling import generate as generate_lib
    return images_main.sample(args, sampling=generate_lib)
  args.num_samples = args.num_samples or 1
  exp, model, params = load_run(args.run_dir, use_ema=args.ema)
  decoding = family_defaults.read_decoding(args.run_dir)  # an imported family's sampler defaults
  family_defaults.fill(args, decoding)
  tok = data_lib.make_tokenizer(exp.data.tokenizer)
  sampler = default_sampler(exp.objective, model) if args.sampler == "auto" else args.sampler
  trained_for = {"ar": ("ar", "speculative", "diffuspec"),
                 "tidar": ("tidar", "ar", "speculative", "diffuspec", "block_diffusion"),
                 "block_diffusion": ("block_diffusion",)}.get(exp.objective.kind, ())
  if sampler not in trained_for and jax.process_index() == 0:
    print(f"note: {args.run_dir} is a {exp.objective.kind} run, not trained for --sampler {sampler}'s mask; its "
          "samples may be poor (--sampler auto picks the run's own).", file=sys.stderr)
  context = exp.data.seq_len
  options, draft, block_size = {}, None, args.block_size
  if sampler == "block_diffusion":
    options = dict(strategy=args.strategy, threshold=args.threshold, steps_per_block=args.steps_per_block,
                   sub_block_size=args.sub_block_size, kv_write=args.kv_write)
    if args.delimiters:
      options.update(delimiters=tuple(tok.encode(prompt_input(tok, args.delimiters))),
                     delimiter_threshold=args.delimiter_threshold)
  elif sampler == "speculative":
    if not args.draft_checkpoint:
      raise UsageError("--sampler speculative needs --draft_checkpoint DIR (a small AR run with the same vocab).")
    draft_exp, draft_model, draft_params = load_run(args.draft_checkpoint)
    if draft_exp.objective.kind == "block_diffusion":
      raise UsageError(f"--draft_checkpoint {args.draft_checkpoint} is a block_diffusion run; speculative decoding "
                       "drafts with a causal LM (an AR or TiDAR run of the same vocabulary). A block-diffusion "
                       "drafter is --sampler diffuspec.")
    draft, options = (draft_params, draft_model), dict(num_draft=args.num_draft)
    context = min(context, draft_exp.data.seq_len)
  elif sampler == "diffuspec":
    if not args.draft_checkpoint:
      raise UsageError("--sampler diffuspec needs --draft_checkpoint DIR (a block-diffusion run with the same vocab).")
    draft_exp, draft_model, draft_params = load_run(args.draft_checkpoint)
    if draft_exp.objective.kind != "block_diffusion":
      raise UsageError(f"--draft_checkpoint {args.draft_checkpoint} is a {draft_exp.objective.kind} run; diffuspec "
                       "drafts with a block-diffusion run of the same vocabulary (e.g. runs/default_byte for a "
                       "byte-level target, or a Fast-dLLM v2 / SDAR fine-tune of the target).")
    draft, options = (draft_params, draft_model), dict(num_draft=args.num_draft, draft_steps=args.draft_steps,
                                                       guide=args.guide,
                                                       draft_token_shift=bool(draft_exp.objective.token_shift))
    block_size = block_size or draft_exp.objective.block_size
    context = min(context, draft_exp.data.seq_len)
  eos_id = tok.eos_id
  if args.chat is not None:  # the template writes BOS etc. itself, as transformers' apply_chat_template
    from ardiff.sampling import chat as chat_lib
    text, end = chat_lib.chat_prompt(args.run_dir, args.chat)
    ids = list(tok.encode(text))
    eos_id = chat_lib.token_id(tok, end) if end is not None else eos_id
  elif decoding.get("add_bos") is False:  # an imported model whose tokenizer has no BOS (Qwen): none is added
    ids = list(tok.encode(prompt_input(tok, args.prompt)))
    if not ids:
      raise UsageError("the prompt is empty and this model adds no BOS; give at least one prompt token.")
  else:
    ids = encode_prompt(tok, prompt_input(tok, args.prompt))
  ids, num_tokens, note = fit_prompt(ids, context=context,
                                     num_tokens=family_defaults.num_tokens(args, decoding, context - len(ids)),
                                     truncate=args.truncate_prompt, bos_id=tok.bos_id)
  if decoding.get("bidirectional") and sampler == "block_diffusion" and block_size is None:
    block_size = len(ids) + num_tokens  # Dream / LLaDA: one bidirectional block over prompt and answer
  if note:
    print(note, file=sys.stderr)
  prompt = np.tile(np.asarray(ids, np.int32), (args.num_samples, 1))
  lengths = np.full(args.num_samples, len(ids))

  def run():
    res = generate(sampler, params, model, prompt, lengths, rng=jax.random.key(args.seed),
                   num_tokens=num_tokens, objective=exp.objective, block_size=block_size, draft=draft,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, eos_id=eos_id, **options)
    jax.block_until_ready(res.tokens)
    return res

  warmup = ""
  if args.warmup:
    print("warm-up: a first, untimed generation compiles the sampler (--no-warmup skips it)", file=sys.stderr)
    start = time.perf_counter()
    run()
    warmup = f" warmup_s={time.perf_counter() - start:.1f} (untimed generation that compiled)"
  start = time.perf_counter()
  res = run()  # timed without compilation unless --no-warmup
  seconds = time.perf_counter() - start
  tokens, n_new = np.asarray(res.tokens), np.asarray(res.lengths)
  if jax.process_index() != 0:
    return 0  # every process of a multi-host job decodes the same samples; one prints them
  for row, n in zip(tokens, n_new):
    print(tok.decode(ids) + tok.decode([int(t) for t in row[:n]]))
    print("-" * 40)
  nfe = int(res.nfe)
  timed = "" if args.warmup else " (compilation included)"
  print(f"sampler={sampler} samples={args.num_samples} new_tokens_total={int(n_new.sum())} "
        f"time={seconds:.3f}s{timed} tokens_per_s_total={n_new.sum() / seconds:.1f} NFE={nfe} "
        f"new_tokens_per_sample={int(n_new.max())} tokens_per_forward_per_sample={n_new.max() / max(nfe, 1):.2f}"
        + warmup)
  return 0
