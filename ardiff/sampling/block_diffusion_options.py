"""The static settings of a block-diffusion run: one frozen, hashable dataclass, validated when it is built.

It is the jit cache key of the sampler (with the model): two calls with equal options share one compile.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Optional

from ardiff.sampling import common
from ardiff.sampling.commit_rules import STRATEGIES

KV_WRITES = ("separate", "fused")


@dataclasses.dataclass(frozen=True)
class BlockDiffusionOptions:
  """Static block-diffusion settings (see :func:`ardiff.sampling.sample_block_diffusion` for their meaning).

  ``steps_per_block`` is resolved (its default is ``block_size``); ``pad_id`` and ``greedy`` are resolved by
  :func:`ardiff.sampling.common.decoding_defaults`; ``mask_id`` and ``vocab_size`` come from the model config.
  """
  block_size: int
  num_blocks: int
  mask_id: int
  vocab_size: int
  strategy: str = "topk_confidence"
  steps_per_block: Optional[int] = None  # None: block_size
  sub_block_size: Optional[int] = None
  delimiters: tuple = ()  # AdaBlock-style adaptive block end (commit_rules.semantic_prefix); () disables
  delimiter_threshold: float = 0.9
  token_shift: bool = False
  kv_write: str = "fused"
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  eos_id: Optional[int] = None
  pad_id: int = 0
  return_trace: bool = False

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}.")
    if self.kv_write not in KV_WRITES:
      raise ValueError(f"kv_write must be one of {KV_WRITES}, got {self.kv_write!r}.")
    if self.mask_id is None:
      raise ValueError("block diffusion needs model.config.mask_token_id (the [MASK] id the model was trained with).")
    if self.block_size < 1 or self.num_blocks < 1:
      raise ValueError(f"block_size ({self.block_size}) and num_blocks ({self.num_blocks}) must be >= 1.")
    if self.steps_per_block is None:
      object.__setattr__(self, "steps_per_block", self.block_size)
    steps = self.steps_per_block
    if self.strategy == "ddpm_cache":
      if steps < 1:
        raise ValueError(f"steps_per_block must be >= 1 for ddpm_cache, got {steps}.")
    elif not 1 <= steps <= self.block_size:
      raise ValueError(f"steps_per_block must be in [1, block_size={self.block_size}], got {steps}.")
    sub = self.sub_block_size
    if sub is not None and (sub < 1 or self.block_size % sub):
      raise ValueError(f"sub_block_size={sub} must be a positive divisor of block_size={self.block_size}.")
    if any(not 0 <= d < self.vocab_size for d in self.delimiters):
      raise ValueError(f"delimiters {self.delimiters} must be token ids in [0, vocab_size={self.vocab_size}).")
    if not 0.0 <= self.delimiter_threshold <= 1.0:  # NaN fails too
      raise ValueError(f"delimiter_threshold must lie in [0, 1], got {self.delimiter_threshold}.")
    # The filters and the EOS id are checked as for every sampler (the model config's two fields they need).
    vocab = types.SimpleNamespace(vocab_size=self.vocab_size, mask_token_id=self.mask_id)
    common.check_decoding_args(vocab, top_k=self.top_k, top_p=self.top_p, eos_id=self.eos_id)

  @classmethod
  def create(cls, config, **kw) -> "BlockDiffusionOptions":
    """Options for a model ``config``: its ``mask_token_id`` and ``vocab_size``."""
    return cls(mask_id=config.mask_token_id, vocab_size=config.vocab_size, **kw)

  @property
  def fused(self) -> bool:
    return self.kv_write == "fused"

  @property
  def k(self) -> int:
    """Positions a count-based rule commits per step: ``ceil(B / steps_per_block)`` (1 for ddpm_cache)."""
    return 1 if self.strategy == "ddpm_cache" else -(-self.block_size // self.steps_per_block)

  @property
  def max_iters(self) -> int:
    """A static bound on loop iterations (and the trace's length).

    Per block, each active row takes at most one iteration for its separate write and ``steps`` denoising steps,
    where every rule but ddpm_cache commits >= 1 position per step (``steps <= B``). ddpm_cache may commit nothing
    for ``steps_per_block - 1`` steps; from then on it unmasks every allowed position: the whole block, or with
    sub-blocks one sub-block per step.
    """
    bs = self.block_size
    if self.strategy != "ddpm_cache":
      steps = bs
    else:
      steps = self.steps_per_block - 1 + (bs // self.sub_block_size if self.sub_block_size else 1)
    return self.num_blocks * (steps + 1)


def check_rule_scalars(**scalars):
  """The commit rules' traced scalars (threshold, factor, gamma) must be finite when they are Python numbers (traced
  values cannot be checked); the temperature is checked by :func:`common.decoding_defaults`."""
  for name, v in scalars.items():
    if isinstance(v, (int, float)) and not math.isfinite(v):
      raise ValueError(f"{name} must be a finite number, got {v}.")
