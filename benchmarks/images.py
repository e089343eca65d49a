"""Image generation side by side: AR vs block diffusion (BD3, block = k rows) vs MDLM on grey-level tokens, and ACDiT
(continuous patches, block = k patch rows) vs a whole-image DiT, trained here for the same number of steps.

For each model: bits per dimension on the test split (discrete models; the NELBO bound for BD3/MDLM, the exact NLL
for AR), Fréchet distance of class-conditional samples to the test split in the features of ardiff's own classifier
(:mod:`ardiff.images.fid`; its test accuracy is printed), that classifier's accuracy on the samples (did the model
draw the class it was asked for), and images/s of the sampler (timed after a warm-up that compiles). One run, one
table (``results.md``, ``results.json``), a plot (``images.png``) and one sample grid per model in ``--out``.

    python benchmarks/images.py --dataset fashion_mnist --size 14 --steps 3000 --num_samples 10000 --out runs/bench_images
    python benchmarks/images.py --dataset digits --steps 50 --num_samples 200 --out /tmp/bench   # smoke run (CPU)
    python benchmarks/images.py --sweep --dataset digits --steps 300 --num_samples 500 --out runs/sweep   # CPU

``--sweep`` runs the block-size sweep in one process: AR, BD3 with blocks of 1 row, 2 rows and half the image, and
whole-image diffusion (MDLM); ACDiT with blocks of 1 patch row, 2 patch rows and half the image, and the whole-image
DiT; ``block_sweep.png`` plots quality and speed against the block size (fraction of the image).

Batches are drawn with numpy (seeded), not grain, so it runs wherever jax, flax and optax do (``--source tfds``
reads the images from a prepared TFDS dataset instead of the vendored / IDX files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ardiff import objectives  # noqa: E402
from ardiff.sampling import generate as sampling_lib  # noqa: E402
from ardiff.config import ModelConfig  # noqa: E402
from ardiff.images import data as data_lib  # noqa: E402
from ardiff.images import discrete, fid, flow  # noqa: E402
from ardiff.images import grid as grid_lib  # noqa: E402
from ardiff.images import tokens as tokens_lib  # noqa: E402
from ardiff.images.model import ACDiT, init_params  # noqa: E402
from ardiff.model import Transformer, init_params as init_transformer  # noqa: E402
from ardiff.objectives import ObjectiveConfig  # noqa: E402
from ardiff.sections import ImageConfig  # noqa: E402


def parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="fashion_mnist", choices=sorted(data_lib.DATASETS))
  p.add_argument("--source", default="files", choices=data_lib.SOURCES, help="files (digits vendored, Fashion-MNIST "
                 "IDX) or tfds (a prepared TFDS dataset; see python -m ardiff images prepare)")
  p.add_argument("--data_dir", default="", help="IDX directory (default /usr/share/datasets/fashion-mnist) or TFDS "
                 "data dir (default ~/tensorflow_datasets)")
  p.add_argument("--size", type=int, default=14, help="side after pooling (digits: 8)")
  p.add_argument("--levels", type=int, default=16, help="grey levels of the discrete models (digits: 17)")
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--num_samples", type=int, default=10000)
  p.add_argument("--sample_batch", type=int, default=1000)
  p.add_argument("--models", default="ar,bd3_r1,mdlm,acdit_r1,dit",
                 help="comma list of ar, bd3_rK (K rows per block), bd3_half, mdlm, acdit_rK (K patch rows), "
                      "acdit_half, dit")
  p.add_argument("--sweep", action="store_true", help="the block-size sweep: " + SWEEP)
  p.add_argument("--width", type=int, default=128, help="model width (4 heads of width/4)")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--denoise_steps", type=int, default=16)
  p.add_argument("--cfg_scale", type=float, default=2.0)
  p.add_argument("--out", default="runs/bench_images")
  return p.parse_args()


SWEEP = "ar,bd3_r1,bd3_r2,bd3_half,mdlm,acdit_r1,acdit_r2,acdit_half,dit"


def model_config(args, vocab):
  return ModelConfig(vocab_size=vocab, embed_dim=args.width, num_layers=args.layers, num_heads=4, num_kv_heads=4,
                     head_dim=args.width // 4, mlp_dim=4 * args.width, scan_layers=False, mask_token_id=vocab - 1,
                     attention_impl="xla")


def unique_blocks(names, side):
  """``names`` without repeats of the same model (``*_half`` is ``*_r2`` on a 4-row patch grid, for example) and
  without block sizes that do not divide the image's rows."""
  seen, out = set(), []
  for name in names:
    rows = side // 2 if name.startswith(("acdit", "dit")) else side  # patch rows (2x2 patches) or pixel rows
    try:
      key = (name.split("_")[0], block_rows(name, rows)) if "_" in name else (name, 0)
    except ValueError as e:  # e.g. 2-patch-row blocks of a 7-row grid (14x14 images)
      print(f"skipped: {e}", flush=True)
      continue
    if key not in seen:
      seen.add(key)
      out.append(name)
  return out


def block_rows(name: str, rows: int) -> int:
  """Rows (pixel rows or patch rows) per block of a ``*_rK`` / ``*_half`` model name."""
  k = rows // 2 if name.endswith("_half") else int(name.split("_r")[1])
  if not 1 <= k <= rows or rows % k:
    raise ValueError(f"model {name!r}: {k} rows per block must divide the {rows} rows of the image.")
  return k


def _adam(args):
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-3, min(100, args.steps // 10 + 1), args.steps, 1e-4)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))


def _fit(loss, params, batches, args):
  tx = _adam(args)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch, i):
    value, grads = jax.value_and_grad(lambda p: loss(p, batch, jax.random.fold_in(jax.random.key(1), i))[0])(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value
  start = time.perf_counter()
  for i in range(args.steps):
    params, opt, value = step(params, opt, batches(i), i)
  jax.block_until_ready(params)
  return params, float(value), time.perf_counter() - start


def run_discrete(name, args, data):
  side, levels = data["side"], args.levels
  hw = side * side
  image = ImageConfig(dataset=args.dataset, source=args.source, size=0 if args.dataset == "digits" else args.size,
                      levels=levels)
  if name == "ar":
    obj, seq_len = ObjectiveConfig(kind="ar"), hw + 1
  elif name == "mdlm":
    obj, seq_len = ObjectiveConfig(block_size=hw + 1), hw + 1
  else:
    block = side * block_rows(name, side)
    obj, seq_len = ObjectiveConfig(block_size=block), hw + block
  cfg = model_config(args, levels + 11)
  model = Transformer(cfg)
  q_train = tokens_lib.quantize(data["train_raw"], data["max"], levels)
  q_test = tokens_lib.quantize(data["test_raw"], data["max"], levels)
  rng = np.random.default_rng(0)
  enc = lambda q, y: {k: jnp.asarray(v) for k, v in tokens_lib.encode(q, y, seq_len=seq_len, levels=levels).items()}

  def batches(i):
    idx = rng.integers(0, len(q_train), args.batch)
    return enc(q_train[idx], data["train_labels"][idx])
  loss = objectives.make_loss_fn(model, obj)
  params, final_loss, train_s = _fit(loss, init_transformer(cfg, jax.random.key(0)), batches, args)
  eval_fn = jax.jit(objectives.make_eval_fn(model, obj))
  total, count = 0.0, 0
  for i in range(0, len(q_test) - args.batch + 1, args.batch):
    out = eval_fn(params, enc(q_test[i:i + args.batch], data["test_labels"][i:i + args.batch]), jax.random.key(i))
    total += float(out["nll_sum" if obj.kind == "ar" else "nelbo_sum"])
    count += int(out["num_targets"])
  exp = types.SimpleNamespace(image=image, data=types.SimpleNamespace(seq_len=seq_len), objective=obj)

  def sample(labels, seed):
    levels_img, invalid, res = discrete.sample_images(params, model, exp, labels, rng=jax.random.key(seed),
                                                       sampling=sampling_lib)
    return tokens_lib.dequantize(levels_img, levels), int(res.nfe), invalid
  block = obj.block_size if obj.kind != "ar" else 1
  return sample, {"bits_per_dim": total / count / math.log(2), "train_loss": final_loss, "train_s": train_s,
                  "seq_len": seq_len, "block": block, "block_fraction": min(block / hw, 1.0)}


def run_continuous(name, args, data):
  side, p = data["side"], 2
  grid = side // p
  n = grid * grid
  block = n if name == "dit" else grid * block_rows(name, grid)
  image = ImageConfig(dataset=args.dataset, source=args.source, size=0 if args.dataset == "digits" else args.size,
                      kind="continuous", patch_size=p, cfg_scale=args.cfg_scale, denoise_steps=args.denoise_steps)
  model = ACDiT(model_config(args, 2), patch_dim=p * p)
  train_patches = np.asarray(flow.patchify(data["train"], p))
  rng = np.random.default_rng(0)

  def batches(i):
    idx = rng.integers(0, len(train_patches), args.batch)
    return {"patches": jnp.asarray(train_patches[idx]), "label": jnp.asarray(data["train_labels"][idx])}
  loss = lambda prm, b, r: flow.flow_loss(prm, b, r, model=model, block_size=block, label_dropout=0.1)
  params, final_loss, train_s = _fit(loss, init_params(model, jax.random.key(0), n), batches, args)

  def sample(labels, seed):
    imgs = flow.sample_images(params, model, labels, rng=jax.random.key(seed), image=image, block_size=block)
    nfe = (n // block) * args.denoise_steps
    return imgs, nfe, 0
  return sample, {"train_loss": final_loss, "train_s": train_s, "block": block, "patches": n, "block_fraction":
                  block / n}


def load(args):
  size = 0 if args.dataset == "digits" else args.size
  tr, trl = data_lib.load_images(args.dataset, "train", size=size, data_dir=args.data_dir, source=args.source)
  te, tel = data_lib.load_images(args.dataset, "test", size=size, data_dir=args.data_dir, source=args.source)
  return {"train_raw": tr, "test_raw": te, "train_labels": trl, "test_labels": tel, "side": tr.shape[1],
          "max": data_lib.max_value(args.dataset), "train": data_lib.to_unit(tr, args.dataset),
          "test": data_lib.to_unit(te, args.dataset)}


def main():
  args = parse()
  if args.dataset == "digits":
    args.size, args.levels = 8, 17
  if args.sweep:
    args.models = SWEEP
  os.makedirs(args.out, exist_ok=True)
  data = load(args)
  t0 = time.perf_counter()
  clf = fid.train_classifier(data["train"], data["train_labels"], steps=3000 if args.steps >= 1000 else 300)
  clf_acc = fid.accuracy(clf, data["test"], data["test_labels"])
  ref_fd = fid.frechet_distance(fid.features(clf, data["train"][:len(data["test"])]), fid.features(clf, data["test"]))
  print(f"classifier: test accuracy {clf_acc:.4f}; FD(train subset, test) = {ref_fd:.3f} "
        f"({time.perf_counter() - t0:.0f}s)", flush=True)
  results = {"dataset": args.dataset, "side": data["side"], "steps": args.steps, "batch": args.batch,
             "width": args.width, "layers": args.layers, "num_samples": args.num_samples,
             "denoise_steps": args.denoise_steps, "cfg_scale": args.cfg_scale, "device": jax.devices()[0].device_kind,
             "classifier_test_accuracy": clf_acc, "fd_train_vs_test": ref_fd, "models": {}}
  labels_all = np.arange(args.num_samples, dtype=np.int32) % 10
  for name in unique_blocks(args.models.split(","), data["side"]):
    t0 = time.perf_counter()
    runner = run_continuous if name.startswith(("acdit", "dit")) else run_discrete
    sample, info = runner(name, args, data)
    bs = min(args.sample_batch, args.num_samples)
    sample(labels_all[:bs], 999)  # warm-up: compiles
    start, imgs, nfe, invalid = time.perf_counter(), [], 0, 0
    for i in range(0, args.num_samples, bs):
      x, nfe, bad = sample(labels_all[i:i + bs], i)
      imgs.append(np.asarray(x))
      invalid += bad
    seconds = time.perf_counter() - start
    imgs = np.concatenate(imgs)[:args.num_samples]
    info.update(fid.sample_metrics(clf, imgs, labels_all[:len(imgs)], data["test"]))
    info.update(images_per_s=len(imgs) / seconds, nfe_per_batch=nfe, invalid_tokens=invalid,
                total_s=time.perf_counter() - t0)
    order = np.concatenate([np.flatnonzero(labels_all[:len(imgs)] == c)[:8] for c in range(10)])
    grid_lib.write_png(os.path.join(args.out, f"samples_{name}.png"),
                       grid_lib.make_grid(imgs[order], ncol=8, scale=grid_lib.grid_scale(data["side"])))
    results["models"][name] = info
    print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in info.items()}), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
  write_table(results, args.out)
  sweep_plot(results, args.out)


def sweep_plot(results, out):
  """``block_sweep.png``: FD, bits/dim and images/s against the block size as a fraction of the image, one line per
  family (discrete: AR -> BD3 -> MDLM; continuous: ACDiT -> DiT)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  models = results["models"]
  families = {"discrete (AR, BD3, MDLM)": [n for n in models if "bits_per_dim" in models[n]],
              "continuous (ACDiT, DiT)": [n for n in models if "bits_per_dim" not in models[n]]}
  fig = Figure(figsize=(11, 3.5))
  FigureCanvasAgg(fig)
  for i, (key, label) in enumerate((("fd", "Fréchet distance to test (lower is better)"),
                                    ("bits_per_dim", "bits/dim (discrete; BD3/MDLM: NELBO)"),
                                    ("images_per_s", "images/s (log)"))):
    ax = fig.add_subplot(1, 3, i + 1)
    for family, names in families.items():
      names = sorted((n for n in names if key in models[n]), key=lambda n: models[n]["block_fraction"])
      if not names:
        continue
      xs, ys = [models[n]["block_fraction"] for n in names], [models[n][key] for n in names]
      ax.plot(xs, ys, marker="o", label=family)
      for n, x, y in zip(names, xs, ys):
        ax.annotate(n, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log", base=2)
    if key == "images_per_s":
      ax.set_yscale("log")
    ax.set_xlabel("block / image", fontsize=8)
    ax.set_title(label, fontsize=9)
    ax.legend(fontsize=7)
  fig.suptitle(f"{results['dataset']} {results['side']}x{results['side']}, {results['steps']} steps, "
               f"{results.get('device', '')}", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "block_sweep.png"), dpi=100)


def write_table(results, out):
  rows = ["| model | block | bits/dim | FD to test | class acc. of samples | images/s | NFE per batch | train s |",
          "|---|---|---|---|---|---|---|---|"]
  for name, r in results["models"].items():
    bpd = f"{r['bits_per_dim']:.3f}" if "bits_per_dim" in r else "-"
    rows.append(f"| {name} | {r['block']} | {bpd} | {r['fd']:.2f} | {r['class_accuracy']:.3f} | "
                f"{r['images_per_s']:.1f} | {r['nfe_per_batch']} | {r['train_s']:.0f} |")
  head = (f"{results['dataset']} {results['side']}x{results['side']}, {results['steps']} steps x batch "
          f"{results['batch']}; classifier test accuracy {results['classifier_test_accuracy']:.4f}, "
          f"FD(train subset, test) = {results['fd_train_vs_test']:.2f}\n\n")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(head + "\n".join(rows) + "\n")
  print(head + "\n".join(rows))
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(9, 3.5))
  FigureCanvasAgg(fig)
  names = list(results["models"])
  for i, (key, label) in enumerate((("fd", "Fréchet distance (lower is better)"), ("images_per_s", "images/s"),
                                    ("class_accuracy", "classifier accuracy on samples"))):
    ax = fig.add_subplot(1, 3, i + 1)
    ax.bar(names, [results["models"][n][key] for n in names])
    ax.set_title(label, fontsize=9)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "images.png"), dpi=100)


if __name__ == "__main__":
  main()
