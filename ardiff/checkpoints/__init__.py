"""The on-disk formats, each read and written in one module, below training, sampling, eval and export:

* :mod:`.paths`: local paths and URLs (``gs://...``) alike.
* :mod:`.checkpointer`: orbax train-state checkpoints (``Checkpointer``) and the corrupt-step fallback
  (``restore_latest``) every reader goes through.
* :mod:`.run_dir`: run directories (``ardiff train``): config, ``load_run``, ``restore_params``, ``init_from``,
  ``metrics.jsonl``.
* :mod:`.params_dir`: params directories (``ardiff export --to params``).
* :mod:`.tree_io`: parameter-tree helpers shared by the formats (flatten, device-slice reads).
* :mod:`.staging`: all-or-nothing output directories for the exporters.

These modules import the model and config layers only, never training, sampling or export.
"""
