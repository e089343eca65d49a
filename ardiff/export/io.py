"""Moved to :mod:`ardiff.checkpoints.staging` (all-or-nothing output directories); re-exported for old callers."""

from ardiff.checkpoints.paths import clean_path, is_url  # noqa: F401
from ardiff.checkpoints.staging import EXPORT_MARKERS, check_output_dir, staged_output  # noqa: F401
