"""Base configs of image experiments (``configs/digits_bd.py``, ``configs/fashion_*.py``): the text base config plus
an ``image`` section, with the sizes the image fixes (sequence length, vocabulary, [MASK] id) filled in.

Imports only the config layer (cheap, like every config file).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from ardiff.experiment import base_config
from ardiff.sections import ImageConfig


def image_base_config(*, family: str, block_size: int = 0, **image) -> ml_collections.ConfigDict:
  """``family``: "ar" | "mdlm" | "bd3" (discrete tokens, text backbone) | "acdit" (continuous patches).

  ``block_size``: bd3 tokens per block (also the class prefix, so pixel blocks stay aligned); acdit patches per
  block. ``image``: fields of :class:`ardiff.sections.ImageConfig`."""
  im = ImageConfig(kind="continuous" if family == "acdit" else "discrete", **image)
  c = base_config()
  c.image = ml_collections.ConfigDict(dataclasses.asdict(im))
  c.data.eval_split = "test"
  c.train.num_samples = 8  # per class: the grid has 10 rows
  n = im.num_tokens
  if family == "acdit":
    c.data.seq_len = n
    c.objective.kind = "block_diffusion"
    c.objective.block_size = block_size or n
    # model.mask_token_id keeps its default: the continuous model has no vocabulary, but block-diffusion configs
    # are validated as such (the id is unused)
    return c
  c.model.vocab_size = im.mask_id + 1
  c.model.mask_token_id = im.mask_id
  if family == "ar":
    c.objective.kind, c.data.seq_len = "ar", n + 1
  elif family == "mdlm":
    c.data.seq_len = n + 1
    c.objective.block_size = n + 1
  elif family == "bd3":
    if block_size < 1 or n % block_size:
      raise ValueError(f"bd3 block_size={block_size} must divide the {n} pixels.")
    c.data.seq_len = n + block_size
    c.objective.block_size = block_size
  else:
    raise ValueError(f"family={family!r} must be 'ar', 'mdlm', 'bd3' or 'acdit'.")
  return c
