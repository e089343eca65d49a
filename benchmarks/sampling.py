"""Sampler throughput: AR (KV cache), block diffusion, TiDAR draft+verify, speculative decoding, side by side.

    python benchmarks/sampling.py                      # tiny RANDOMLY INITIALISED models on CPU (< 2 min)
    python benchmarks/sampling.py --run_dir RUN        # a trained AR/TiDAR run (`ardiff train`): AR, TiDAR,
                                                       # speculative target; gen-PPL of every sample under it
    python benchmarks/sampling.py --run_dir RUN --bd_run_dir BD_RUN --draft_run_dir SMALL_AR_RUN

Every row: tokens/s (generated tokens of all rows / median wall time after a compile call), tokens per forward
(generated tokens per row / forwards; speculative counts TARGET forwards, the drafter's are listed apart), and the
ratio to AR tokens/s measured in the same run. With random weights the acceptance rates and the block-diffusion
commit counts say nothing about trained models: only the mechanics and per-forward costs are measured.
Block diffusion uses ``--bd_run_dir`` when given, otherwise the same weights as the AR rows (a random model is a
valid "diffusion model" for timing). TiDAR needs the model's ``mask_token_id``. Gen-PPL (``--run_dir`` only) is
exp(mean NLL of the generated tokens given prompt and earlier tokens) under the AR model; it is printed for each
sampler's samples (AR, TiDAR and speculative sample the same distribution, so their gen-PPLs should agree).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_time(fn, iters):
  import jax
  res = fn()  # compile
  jax.block_until_ready(res)
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    res = fn()
    jax.block_until_ready(res)
    ts.append(time.perf_counter() - t0)
  return sorted(ts)[len(ts) // 2], res


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--run_dir", default=None, help="AR/TiDAR run for AR, TiDAR, speculative target and gen-PPL")
  p.add_argument("--bd_run_dir", default=None, help="block-diffusion run (default: the --run_dir / random model)")
  p.add_argument("--draft_run_dir", default=None, help="small AR run as drafter (default: a random 1-layer model)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prompt_len", type=int, default=16, help="a multiple of every block size (block diffusion)")
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--block_sizes", default="4,8,16")
  p.add_argument("--tidar_block", type=int, default=4, help="TiDAR B: B-1 drafts, B+B*B rows per forward")
  p.add_argument("--num_draft", type=int, default=4, help="speculative drafts per step")
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  from ardiff import masks as masks_lib
  from ardiff.config import ModelConfig
  from ardiff.model import Transformer, init_params
  from ardiff.sampling import sample_ar, sample_block_diffusion
  from ardiff.sampling.common import remove_mask_logit
  from ardiff.sampling.speculative import sample_speculative
  from ardiff.sampling.tidar import sample_tidar

  def load(run_dir):
    from ardiff.training.main import load_run
    exp, model, params = load_run(run_dir)
    return model, params, exp.objective.kind

  if args.run_dir:
    model, params, kind = load(args.run_dir)
    source = f"run {args.run_dir} (objective {kind})"
    if kind == "block_diffusion":
      print(f"note: {args.run_dir} is a block-diffusion run: its causal forward is not a trained AR model, so the "
            "AR/TiDAR/speculative rows and the gen-PPL column only exercise the mechanics")
  else:
    cfg = ModelConfig(vocab_size=64, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_dim=128, mask_token_id=63, init_std=0.3, attention_impl="xla")
    model = Transformer(cfg)
    params = jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(args.seed))
    source = "tiny RANDOMLY INITIALISED models (vocab 64, embed 64, 2 layers; drafter 1 layer)"
  vocab = model.config.vocab_size
  if args.draft_run_dir:
    dmodel, dparams, _ = load(args.draft_run_dir)
  else:
    dcfg = model.config.replace(num_layers=1, init_std=min(model.config.init_std, 0.3), scan_layers=False)
    dmodel = Transformer(dcfg)
    dparams = jax.jit(lambda r: init_params(dcfg, r))(jax.random.PRNGKey(args.seed + 1))
  bd_model, bd_params = load(args.bd_run_dir)[:2] if args.bd_run_dir else (model, params)

  rng = np.random.default_rng(args.seed)
  hi = model.config.mask_token_id if model.config.mask_token_id is not None else vocab
  prompt = rng.integers(0, hi, size=(args.batch, args.prompt_len)).astype(np.int32)
  lens = np.full(args.batch, args.prompt_len, np.int32)
  key = jax.random.PRNGKey(args.seed)
  n_new, temp = args.new_tokens, args.temperature

  rows = []  # (name, seconds, tokens [b, n], lengths [b], forwards, extra)

  def add(name, fn, forwards, extra=""):
    sec, res = _median_time(fn, args.iters)
    rows.append((name, sec, np.asarray(res.tokens), np.asarray(res.lengths), forwards(res), extra(res) if extra else ""))

  add("AR (KV cache)", lambda: sample_ar(params, model, prompt, lens, rng=key, max_new_tokens=n_new,
                                         temperature=temp), lambda r: int(r.nfe))
  for bs in [int(x) for x in args.block_sizes.split(",")]:
    if args.prompt_len % bs:
      print(f"skip block diffusion B={bs}: prompt_len {args.prompt_len} is not a multiple of it")
      continue
    nb = max(1, n_new // bs)
    common_kw = dict(rng=key, block_size=bs, num_blocks=nb, temperature=temp)
    add(f"BD B={bs} topk_confidence k=2", lambda: sample_block_diffusion(
        bd_params, bd_model, prompt, lens, strategy="topk_confidence", steps_per_block=max(1, bs // 2), **common_kw),
        lambda r: int(r.nfe))
    for tau in (0.7, 0.9):
      add(f"BD B={bs} threshold tau={tau}", lambda: sample_block_diffusion(
          bd_params, bd_model, prompt, lens, strategy="threshold", threshold=tau, **common_kw), lambda r: int(r.nfe))
  if model.config.mask_token_id is not None:
    tb = args.tidar_block
    add(f"TiDAR B={tb} ({tb - 1} drafts, {tb + tb * tb} rows)", lambda: sample_tidar(
        params, model, prompt, lens, rng=key, max_new_tokens=n_new, block_size=tb, temperature=temp),
        lambda r: int(r.nfe), lambda r: f"accept {float(np.mean(r.accepted)) / max(int(r.steps), 1):.2f}/step")
  k = args.num_draft
  add(f"speculative k={k} (target NFE)", lambda: sample_speculative(
      params, model, dparams, dmodel, prompt, lens, rng=key, max_new_tokens=n_new, num_draft=k, temperature=temp),
      lambda r: int(r.nfe),
      lambda r: f"drafter NFE {int(r.draft_nfe)}, accept {float(np.mean(r.accepted)) / max(int(r.steps), 1):.2f}/step")

  gen_ppl = {}
  if args.run_dir:
    fwd = jax.jit(lambda p_, t: model.apply({"params": p_}, t, mask=masks_lib.Causal()).logits)
    for name, _, toks, lengths, _, _ in rows:
      seq = np.concatenate([prompt, toks], axis=1)
      logits = remove_mask_logit(fwd(params, jnp.asarray(seq))[:, args.prompt_len - 1:-1], model.config.mask_token_id)
      lp = jax.nn.log_softmax(logits, -1)
      nll = -np.take_along_axis(np.asarray(lp), toks[..., None], -1)[..., 0]
      valid = np.arange(toks.shape[1])[None] < lengths[:, None]
      gen_ppl[name] = float(np.exp(nll[valid].mean()))

  ar_tps = rows[0][3].sum() / rows[0][1]
  print(f"\nSampling benchmark on {jax.devices()[0].device_kind} ({jax.default_backend()}), {source}")
  print(f"batch {args.batch}, prompt {args.prompt_len}, new tokens {n_new}, temperature {temp}, "
        f"median of {args.iters} after compile\n")
  head = f"| {'sampler':<40} | {'tokens/s':>9} | {'x AR':>5} | {'tok/fwd':>7} | {'NFE':>4} |"
  head += " gen-PPL |" if gen_ppl else ""
  head += " notes"
  print(head)
  print("|" + "-" * 42 + "|" + "-" * 11 + "|" + "-" * 7 + "|" + "-" * 9 + "|" + "-" * 6 + "|"
        + ("-" * 9 + "|" if gen_ppl else "") + "------")
  for name, sec, toks, lengths, nfe, extra in rows:
    tps = lengths.sum() / sec
    line = f"| {name:<40} | {tps:9.1f} | {tps / ar_tps:5.2f} | {lengths.mean() / nfe:7.2f} | {nfe:4d} |"
    if gen_ppl:
      line += f" {gen_ppl[name]:7.2f} |"
    print(line + f" {extra}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
