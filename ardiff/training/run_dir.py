"""Moved to :mod:`ardiff.checkpoints.run_dir` (the run-directory format); re-exported for old callers."""

from ardiff.checkpoints.paths import as_path  # noqa: F401
from ardiff.checkpoints.run_dir import (CHECKPOINTS, CONFIG_FILE, METRICS_FILE, TB_DIR, MetricsLog,  # noqa: F401
                                        load_params, load_run, read_config, restore_params, rewind_metrics,
                                        write_config)
