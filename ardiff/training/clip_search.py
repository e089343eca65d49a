"""BD3-LM's data-driven clipped noise schedule (docs/algorithms.md §2.3), run by the trainer when
``objective.clip_search`` is on.

Every ``objective.clip_search_every`` optimizer steps (0: ``train.eval_every``) the trainer calls :func:`search`:
for each candidate ``[lo, lo + w]`` (:func:`ardiff.objectives.schedules.candidate_intervals`) it records the
per-block NELBO (:func:`ardiff.objectives.diffusion.per_block_nelbo`, t ~ U[lo, lo + w]) over at most
``objective.clip_search_batches`` validation batches, and picks the candidate whose values have the smallest
variance (:func:`ardiff.objectives.schedules.select_min_variance`). Training then draws t from that interval: it
lives in ``TrainState.clip`` (a traced input of the train step, so moving it never recompiles, and it is saved
in every checkpoint, so a resumed run continues with the same interval). The reported validation NELBO is not
affected: it always integrates over the full range (the clipped estimator is biased).
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ardiff.checkpoints import run_dir as run_dir_lib
from ardiff.model import Transformer
from ardiff.objectives import base, diffusion, schedules


def initial_clip(cfg: base.ObjectiveConfig) -> Optional[jax.Array]:
  """``float32[2]`` ``[clip_low, clip_high]`` a train state starts from under ``clip_search``; None without it
  (the state then has no interval and the loss uses the config's, exactly as before the search existed)."""
  return jnp.array([cfg.clip_low, cfg.clip_high], jnp.float32) if cfg.clip_search else None


def search_every(cfg: base.ObjectiveConfig, eval_every: int) -> int:
  """Optimizer steps between searches: ``clip_search_every``, or ``eval_every`` when that is 0; 0 = never."""
  if not cfg.clip_search:
    return 0
  return cfg.clip_search_every or eval_every


def check_resume(run_dir, cfg: base.ObjectiveConfig) -> None:
  """Before resuming ``run_dir``: its checkpoints hold a noise interval exactly when it was trained with the search,
  so flipping ``objective.clip_search`` cannot resume it (orbax would only report a tree mismatch)."""
  if not (run_dir_lib.as_path(run_dir) / run_dir_lib.CONFIG_FILE).exists():
    return
  try:
    config, _ = run_dir_lib.read_config(run_dir)
  except ValueError:  # a damaged config.json: the trainer rewrites it from the config it runs with
    return
  before = bool(config.get("objective", {}).get("clip_search", False))
  if before != cfg.clip_search:
    raise ValueError(f"objective.clip_search={cfg.clip_search}, but the checkpoints in {run_dir} were trained with "
                     f"clip_search={before}, so their train state {'has' if before else 'has no'} noise interval. "
                     f"Keep objective.clip_search={before} to resume them, or train into a new train.run_dir with "
                     f"train.init_from={run_dir} to start from their parameters.")


def make_per_block_fn(model: Transformer, cfg: base.ObjectiveConfig) -> Callable:
  """Jitted ``(params, batch, rng, low=, high=) -> (nelbo [b, nb], has_targets [b, nb])``; ``low``/``high`` are
  traced, so every candidate reuses one compile."""
  return jax.jit(functools.partial(diffusion.per_block_nelbo, model=model, cfg=cfg))


def _to_host(x) -> np.ndarray:
  # a global (batch-sharded) array: every process gets all of it (bd3lms all_gathers across devices too)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def collect(params, batches: Iterable[dict], candidates, *, per_block_fn: Callable, rng: jax.Array,
            max_batches: int, put_batch: Optional[Callable] = None) -> dict:
  """``{(lo, hi): float64[n]}``: the per-block NELBO of every block with targets in the first ``max_batches``
  batches, for each candidate interval.

  Every candidate sees the same batches and the same random draws (``rng`` folded with the batch index): the
  blocks' ``u`` and masking uniforms are shared and only ``t = lo + (hi - lo) u`` changes, so candidates are
  compared on common random numbers rather than on sampling luck.
  """
  batches = list(itertools.islice(batches, max_batches))
  if not batches:
    raise ValueError("the clipped-schedule search got no validation batches: is the evaluation split empty? "
                     "Check data.eval_split, or set objective.clip_search=False.")
  if put_batch is not None:
    batches = [put_batch(batch) for batch in batches]
  keys = [jax.random.fold_in(rng, j) for j in range(len(batches))]
  out = {}
  for lo, hi in candidates:
    values = []
    for batch, key in zip(batches, keys):
      nelbo, has_targets = per_block_fn(params, batch, key, low=jnp.float32(lo), high=jnp.float32(hi))
      values.append(_to_host(nelbo)[_to_host(has_targets)])
    out[(lo, hi)] = np.concatenate(values).astype(np.float64)
  return out


def search(params, batches: Iterable[dict], cfg: base.ObjectiveConfig, *, per_block_fn: Callable, rng: jax.Array,
           put_batch: Optional[Callable] = None) -> tuple[tuple[float, float], float]:
  """One search round: the minimum-variance candidate interval ``(lo, hi)`` and its variance."""
  candidates = schedules.candidate_intervals(cfg.clip_search_widths, delta=cfg.clip_search_delta)
  samples = collect(params, batches, candidates, per_block_fn=per_block_fn, rng=rng,
                    max_batches=cfg.clip_search_batches, put_batch=put_batch)
  if not any(len(v) > 1 for v in samples.values()):
    raise ValueError("the clipped-schedule search found fewer than 2 blocks with targets in the validation batches; "
                     "raise objective.clip_search_batches or use a larger evaluation split.")
  best, variances = schedules.select_min_variance(samples)
  return best, variances[best]


def run(state, batches: Iterable[dict], cfg: base.ObjectiveConfig, *, per_block_fn: Callable, step: int,
        clip_sharding, put_batch: Optional[Callable] = None):
  """The trainer's search round at optimizer step ``step``, on ``state.params``: returns the state with its
  ``clip`` set to the chosen interval (placed with ``clip_sharding``) and the metrics to log. Its randomness is a
  function of ``step`` alone, so a resumed run repeats it exactly."""
  interval, min_var = search(state.params, batches, cfg, per_block_fn=per_block_fn,
                             rng=jax.random.fold_in(jax.random.key(step), 1), put_batch=put_batch)
  clip = jax.device_put(jnp.asarray(interval, jnp.float32), clip_sharding)
  return state.replace(clip=clip), schedule_metrics(interval, min_var)


def schedule_metrics(interval: tuple[float, float], min_variance: float) -> dict:
  """What the trainer logs after a search (metrics.jsonl and TensorBoard)."""
  return {"schedule/clip_low": float(interval[0]), "schedule/clip_high": float(interval[1]),
          "schedule/min_variance": float(min_variance)}
