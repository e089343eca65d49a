"""``ardiff export --to params``: a training run's latest parameters (or EMA) as a params directory.

The params-directory format itself (layout, ``save_params_dir``, ``load_params_dir``, checks) is read and written in
:mod:`ardiff.checkpoints.params_dir`.
"""

from __future__ import annotations

from ardiff.checkpoints import staging
from ardiff.checkpoints.params_dir import FORMATS, save_params_dir, tokenizer_file_of
from ardiff.checkpoints.run_dir import load_run


def export_params(run_dir, out_dir, *, use_ema: bool = False, format: str = "safetensors",
                  overwrite: bool = False) -> str:
  """The latest parameters (or their EMA) of a training run as a params directory (see
  :mod:`ardiff.checkpoints.params_dir`), carrying the run's experiment config and tokenizer file. Returns
  ``out_dir``."""
  if format not in FORMATS:
    raise ValueError(f"format={format!r} must be one of {FORMATS}.")
  run_dir = staging.clean_path(run_dir)
  staging.check_output_dir(out_dir, overwrite=overwrite)  # refuse before the (slow) restore
  exp, _, params = load_run(run_dir, use_ema=use_ema)
  return save_params_dir(params, exp.model, out_dir, format=format, run_config=exp.raw.to_dict(),
                         tokenizer_file=tokenizer_file_of(exp.data.tokenizer), overwrite=overwrite,
                         extra={"source": run_dir, "use_ema": bool(use_ema)})
