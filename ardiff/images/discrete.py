"""Discrete image runs through the text backbone, objectives and samplers: the trainer's data, eval and samples.

The trainer (:mod:`ardiff.training.main`) calls :func:`make_datasets`, :func:`eval_batches` and
:func:`write_samples` instead of the text versions when the config has an ``image`` section of
``kind="discrete"``. Everything else (model, AR / MDLM / BD3 objective, optimizer, checkpoints with the data
iterator, resume, eval) is the text path unchanged. The eval's ``bits_per_token`` is bits per dimension: the only
targets are pixels (the class prefix has ``loss_mask = 0``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from ardiff.images import data as data_lib
from ardiff.images import grid as grid_lib
from ardiff.images import tokens as tokens_lib
from ardiff.sections import IMAGE_CLASSES


@dataclasses.dataclass(frozen=True)
class ImageVocab:
  """What the trainer calls the tokenizer of an image run: ids ``0..levels-1`` pixels, then classes, then [MASK]."""

  levels: int

  @property
  def vocab_size(self) -> int:
    return self.levels + IMAGE_CLASSES + 1

  @property
  def mask_id(self) -> int:
    return self.levels + IMAGE_CLASSES


def _transform(exp):
  im = exp.image
  return tokens_lib.DiscreteTransform(max_value=data_lib.max_value(im.dataset), seq_len=exp.data.seq_len,
                                      levels=im.levels, order=im.order, patch_size=im.patch_size)


def _load(exp, split):
  im = exp.image
  return data_lib.load_images(im.dataset, split, size=im.size, data_dir=im.data_dir, source=im.source)


def _batches(exp, split: str, batch_size: int, *, seed: int, shuffle: bool, num_epochs, batch_sh=None):
  """Per-process batches of the global ``batch_size``. With ``batch_sh`` (the trainer's batch sharding) one grain
  iterator per local data shard, as the text pipeline's ``ShardedBatches``; else one per process."""
  images, labels = _load(exp, split)
  make = lambda index, count: data_lib.make_dataset(images, labels, _transform(exp), seed=seed, batch_size=batch_size,
                                                    shuffle=shuffle, num_epochs=num_epochs, shard_index=index,
                                                    shard_count=count)
  if batch_sh is None:
    return make(jax.process_index(), jax.process_count())
  from ardiff.data import pipeline
  num, mine = pipeline.batch_shards(batch_sh, batch_size)
  return pipeline.ShardedBatches({s: make(s, num) for s in mine}, num)


def make_datasets(exp, batch_sh=None, *, seed: int):
  """``(training micro-batches, ImageVocab)``: shuffled, repeated forever, checkpointable iterator state."""
  micro = exp.train.batch_size // exp.optimizer.grad_accum_steps
  return _batches(exp, "train", micro, seed=seed, shuffle=True, num_epochs=None, batch_sh=batch_sh), \
      ImageVocab(exp.image.levels)


def eval_batches(exp, batch_sh=None):
  """One ordered pass over the test split."""
  return iter(_batches(exp, "test", exp.train.batch_size, seed=0, shuffle=False, num_epochs=1, batch_sh=batch_sh))


def prefix_len(exp) -> int:
  return exp.data.seq_len - exp.image.side ** 2


def sample_images(params, model, exp, labels: np.ndarray, *, rng, sampling, strategy: str = "first_hitting",
                  steps_per_block: Optional[int] = None, temperature: float = 1.0):
  """``(levels int32[n, S, S], invalid count, sampler result)`` for the class ``labels [n]``, from the run's own
  family: AR, or block diffusion with the exact KV cache (``first_hitting`` with one token per step is BD3's exact
  sampler; other strategies of :mod:`ardiff.sampling.commit_rules` trade exactness for fewer forwards).

  ``sampling``: the module :mod:`ardiff.sampling.generate`, passed in by the caller (the trainer, ``ardiff
  sample``, the benchmark): ``ardiff.images`` sits below ``ardiff.sampling`` and ``ardiff.training`` in the package
  layering (they hand image runs over to it), so it does not import them."""
  default_sampler, generate = sampling.default_sampler, sampling.generate
  im = exp.image
  n_pix = im.side ** 2
  prompt = tokens_lib.class_prefix(labels, prefix=prefix_len(exp), levels=im.levels)
  sampler = default_sampler(exp.objective, model)
  options = dict(strategy=strategy, steps_per_block=steps_per_block) if sampler == "block_diffusion" else {}
  res = generate(sampler, params, model, prompt, np.full(len(labels), prompt.shape[1]), rng=rng,
                 num_tokens=n_pix, objective=exp.objective, temperature=temperature, top_p=1.0, **options)
  pixels = np.asarray(res.tokens)[:, :n_pix]
  levels_img, invalid = tokens_lib.decode(pixels, side=im.side, levels=im.levels, order=im.order,
                                          patch_size=im.patch_size)
  return levels_img, invalid, res


def grid_labels(per_class: int) -> np.ndarray:
  """``[10 * per_class]``: row c of the grid is class c."""
  return np.repeat(np.arange(IMAGE_CLASSES, dtype=np.int32), per_class)


def write_samples(params, model, exp, run_dir, *, per_class: Optional[int] = None, rng=None, out=None,
                  **kwargs) -> str:
  """``samples.png`` in ``run_dir`` (or the PNG ``out``): one row per class, ``per_class`` (default
  ``train.num_samples``) columns. Returns a line naming the file."""
  per_class = per_class or exp.train.num_samples
  levels_img, invalid, _ = sample_images(params, model, exp, grid_labels(per_class),
                                         rng=jax.random.key(0) if rng is None else rng, **kwargs)
  grid = grid_lib.make_grid(tokens_lib.dequantize(levels_img, exp.image.levels), ncol=per_class,
                            scale=grid_lib.grid_scale(exp.image.side))
  path = grid_lib.write_png(out or run_dir / "samples.png", grid)
  note = f" ({invalid} sampled class ids drawn as white pixels)" if invalid else ""
  return f"wrote {IMAGE_CLASSES}x{per_class} class-conditional samples to {path}{note}"
