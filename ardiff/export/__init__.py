"""Checkpoint interchange: Hugging Face import/export (:mod:`.hf_import`, :mod:`.hf_export`; :mod:`.hf` re-exports
both), portable params directories (:mod:`.params`), AR -> block-diffusion conversion (:mod:`.convert`), the
``ardiff export`` command (:mod:`.main`) and StableHLO serving export (:mod:`.stablehlo`).

Submodules are imported on use (``from ardiff.export import convert``); none of them imports torch.
"""

from ardiff.export.hf_export import export_hf  # noqa: F401
from ardiff.export.hf_import import import_hf  # noqa: F401
