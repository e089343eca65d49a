"""Checkpoint interchange: Hugging Face import/export (:mod:`.hf`), portable params directories (:mod:`.params`),
AR -> block-diffusion conversion (:mod:`.convert`), the ``ardiff export`` command (:mod:`.main`) and StableHLO
serving export (:mod:`.stablehlo`).

Submodules are imported on use (``from ardiff.export import convert``); none of them imports torch.
"""

from ardiff.export.hf import export_hf, import_hf  # noqa: F401
