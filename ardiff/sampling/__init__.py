"""Samplers: AR with a KV cache, block diffusion with an exact block-causal KV cache, TiDAR draft+verify,
speculative decoding, and the shared logit processing."""

from ardiff.sampling.ar import ARResult, prefill, sample_ar
from ardiff.sampling.block_diffusion import (KV_WRITES, STRATEGIES, BlockDiffusionResult, commit_mask,
                                             sample_block_diffusion)
from ardiff.sampling.common import process_logits, sample_tokens
from ardiff.sampling.reference import reference_block_logits, reference_greedy_block_diffusion
from ardiff.sampling.speculative import SpeculativeResult, sample_speculative
from ardiff.sampling.tidar import TiDARResult, sample_tidar

__all__ = ["ARResult", "BlockDiffusionResult", "KV_WRITES", "STRATEGIES", "SpeculativeResult", "TiDARResult",
           "commit_mask", "prefill", "process_logits", "reference_block_logits", "reference_greedy_block_diffusion",
           "sample_ar", "sample_block_diffusion", "sample_speculative", "sample_tidar", "sample_tokens"]
