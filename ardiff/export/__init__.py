"""Checkpoint interchange: Hugging Face import/export (:mod:`.hf_import`, :mod:`.hf_export`; :mod:`.hf` re-exports
both), portable params directories (:mod:`.params`), AR -> block-diffusion conversion and the diffusion-LM families
(:mod:`.convert`: ``import_family``; :mod:`.families`), the offline HF-cache resolver (:mod:`.hf_cache`), the
``ardiff export`` command (:mod:`.main`), StableHLO serving export (:mod:`.stablehlo`) and the sampler-step
compile of an imported checkpoint (:mod:`.hf_compile`).

Submodules are imported on use (``from ardiff.export import convert``); none of them imports torch.
"""

from ardiff.export.hf_export import export_hf  # noqa: F401
from ardiff.export.hf_import import import_hf  # noqa: F401
