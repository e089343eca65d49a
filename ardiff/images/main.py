"""``python -m ardiff sample --checkpoint RUN`` for image runs: a class-conditional PNG grid (one row per class).

:mod:`ardiff.sampling.main` hands over here when the run's config has an ``image`` section. Discrete runs sample
with their family's sampler (AR, or block diffusion with the exact KV cache and BD3's exact first-hitting rule,
``--steps_per_block`` to commit several tokens per step); continuous (ACDiT) runs with ``--steps_per_block`` Euler
steps per block (default ``image.denoise_steps``), guidance ``--cfg_scale`` (default ``image.cfg_scale``) and
``--kv_write``. ``--num_samples`` is per class (default: the run's ``train.num_samples``, the grid its training
wrote). Prints the PNG's path and the timed generation's images/s.
"""

from __future__ import annotations

import sys
import time

import jax

from ardiff.checkpoints import run_dir as run_dir_lib


def is_image_run(run_dir) -> bool:
  """Whether ``run_dir``'s config.json has an image section (False when it cannot be read: the text path then
  reports what is wrong)."""
  try:
    config, _ = run_dir_lib.read_config(run_dir)
  except (OSError, ValueError, KeyError):
    return False
  return config.get("image") is not None


def sample(args, *, sampling) -> int:
  """``args``: the parsed flags of ``ardiff sample`` (plus ``cfg_scale`` and ``out``); ``sampling``: the module
  :mod:`ardiff.sampling.generate` (see :func:`ardiff.images.discrete.sample_images`)."""
  from ardiff.images import acdit_train, discrete

  config, _ = run_dir_lib.read_config(args.run_dir)
  per_class = args.num_samples or config.train.num_samples or 1
  if config.image.kind == "continuous":
    exp, model, params = acdit_train.load(args.run_dir)
    write = lambda rng, out: acdit_train.write_samples(
        params, model, exp, args.run_dir, per_class=per_class, rng=rng, cfg_scale=args.cfg_scale,
        steps=args.steps_per_block, kv_write=args.kv_write, out=out)
  else:
    exp, model, params = run_dir_lib.load_run(args.run_dir, use_ema=args.ema)
    write = lambda rng, out: discrete.write_samples(
        params, model, exp, run_dir_lib.as_path(args.run_dir), out=out, per_class=per_class, rng=rng,
        sampling=sampling, steps_per_block=args.steps_per_block,
        temperature=1.0 if getattr(args, "temperature", None) is None else args.temperature)
  out = run_dir_lib.as_path(args.out) if args.out else None
  if args.warmup:
    print("warm-up: a first, untimed generation compiles the sampler (--no-warmup skips it)", file=sys.stderr)
    write(jax.random.key(args.seed), out)
  start = time.perf_counter()
  line = write(jax.random.key(args.seed), out)
  seconds = time.perf_counter() - start
  n = 10 * per_class
  print(line)
  print(f"images={n} time={seconds:.3f}s images_per_s={n / seconds:.2f}"
        + ("" if args.warmup else " (compilation included)"))
  return 0
