"""Samplers: AR with a KV cache, block diffusion with an exact block-causal KV cache, shared logit processing."""

from ardiff.sampling.ar import ARResult, prefill, sample_ar
from ardiff.sampling.block_diffusion import (STRATEGIES, BlockDiffusionResult, commit_mask, reference_block_logits,
                                             sample_block_diffusion)
from ardiff.sampling.common import process_logits, sample_tokens

__all__ = ["ARResult", "BlockDiffusionResult", "STRATEGIES", "commit_mask", "prefill", "process_logits",
           "reference_block_logits", "sample_ar", "sample_block_diffusion", "sample_tokens"]
