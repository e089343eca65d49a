"""Moved to :mod:`ardiff.checkpoints.checkpointer` (orbax checkpoints and the corrupt-step fallback); re-exported
for old callers."""

from ardiff.checkpoints.checkpointer import (KILL_ENV, Checkpointer, MissingItemError,  # noqa: F401
                                             NoCheckpointError, quarantine, restore_latest, step_problem)
from ardiff.checkpoints.paths import as_path  # noqa: F401
