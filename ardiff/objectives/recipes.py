"""AR -> block-diffusion fine-tuning recipes (docs/algorithms.md §6): the objective fields each one sets.

Written once here; ``python -m ardiff convert --recipe`` and ``configs/finetune.py:recipe=...`` both read it.
Fast-dLLM v2's token shift keeps the AR model's "row i-1 predicts token i" head, which is why it adapts fastest
(benchmarks/convert_vs_scratch.py).
"""

RECIPES = {
    # Fast-dLLM v2: token shift, complementary masks, unweighted cross-entropy
    "fastdllm_v2": dict(token_shift=True, complementary_masks=True, weighting="none"),
    # SDAR: no shift, one mask, 1/p_mask weights
    "sdar": dict(token_shift=False, complementary_masks=False, weighting="p_mask"),
    # BD3-LM's own objective: NELBO (1/t) weights
    "bd3": dict(token_shift=False, complementary_masks=False, weighting="nelbo"),
}
DEFAULT_RECIPE = "fastdllm_v2"


def recipe_fields(name: str) -> dict:
  """The ``objective`` fields of recipe ``name``; a clear error for an unknown one."""
  if name not in RECIPES:
    raise ValueError(f"recipe={name!r} is not a recipe; use one of {', '.join(sorted(RECIPES))}.")
  return dict(RECIPES[name])
