"""Moved to :mod:`ardiff.checkpoints.tree_io`; re-exported for old callers."""

from ardiff.checkpoints.tree_io import flatten, fit_sharding, norm_index, unflatten  # noqa: F401
