"""Hugging Face Llama / Qwen2 / Qwen3 checkpoints <-> ardiff parameters (safetensors, no torch at run time).

``import_hf(model_dir)`` reads ``config.json`` and ``*.safetensors`` and returns ``(ModelConfig, params)``, with
``mesh=`` straight into each array's ``NamedSharding`` (:mod:`ardiff.export.hf_import`). ``export_hf(params, cfg,
out_dir)`` writes a directory that ``transformers`` loads with ``from_pretrained`` (:mod:`ardiff.export.hf_export`).
The ``config.json`` mapping is :mod:`ardiff.export.hf_config`, the tensor layouts :mod:`ardiff.export.hf_layout`.

This module re-exports their public names for callers of ``ardiff.export.hf``; library code imports from the
modules above.
"""

from ardiff.export.hf_config import (SUPPORTED_ARCHITECTURES, UnsupportedCheckpointError, config_from_hf,  # noqa: F401
                                     config_to_hf, hf_kind, read_hf_config)
from ardiff.export.hf_export import DEFAULT_TOKENIZER_FILES, export_hf, params_to_hf_tensors  # noqa: F401
from ardiff.export.hf_import import import_hf  # noqa: F401
