"""The typed sections of an experiment: frozen dataclasses validated on construction, holding the ONE set of defaults.

``ModelConfig`` (here), ``ObjectiveConfig`` (:mod:`ardiff.objectives.base`), ``DataConfig``, ``MeshConfig``,
``OptimizerConfig`` and ``TrainConfig`` (:mod:`ardiff.sections`). Experiments keep their settings in
ml_collections configs (``configs/``) whose defaults come from these classes (:func:`ardiff.experiment.base_config`);
``from_dict`` turns a section into its value and rejects unknown keys with the list of known ones.

Model field names follow the Llama family so Hugging Face configs map one to one (``embed_dim`` = ``hidden_size``,
``mlp_dim`` = ``intermediate_size``, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Optional

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


def unknown_keys_error(section: str, unknown, known) -> ValueError:
  """A ValueError naming each unknown key, the closest known key, and the full list."""
  hints = []
  for key in sorted(unknown):
    close = difflib.get_close_matches(key, list(known), n=1)
    hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
  return ValueError(f"Unknown key(s) in {section}: {', '.join(hints)}. Known keys: {', '.join(sorted(known))}.")


def dataclass_from_dict(cls, d: Mapping[str, Any], section: str):
  """``cls(**d)`` for a config dataclass, rejecting unknown keys with :func:`unknown_keys_error`."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - known
  if unknown:
    raise unknown_keys_error(section, unknown, known)
  return cls(**dict(d))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention."""

  vocab_size: int = 259
  embed_dim: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 384
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 has biases on q/k/v projections.
  o_bias: bool = False  # Llama/Qwen3 attention_bias=True: a bias on o_proj too
  mlp_bias: bool = False  # Llama mlp_bias=True: biases on gate/up/down_proj
  qk_norm: bool = False  # Qwen3: per-head RMSNorm (weight [head_dim]) on q and k before RoPE
  # RoPE scaling (ardiff.rope): None, or (key, value) pairs with rope_type in linear/dynamic/yarn/llama3 and that
  # type's parameters, named as transformers' rope_parameters; a mapping is accepted and stored as sorted pairs.
  rope_scaling: Optional[tuple] = None
  dtype: str = "float32"  # compute dtype; parameters stay in param_dtype
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"  # "xla" (non-empty tiles; cuDNN on GPU), "pallas" (kernels), "auto" (pallas on TPU/GPU)
  mask_token_id: Optional[int] = None  # the [MASK] id of diffusion models; never predicted
  init_std: float = 0.02

  def __post_init__(self):
    def positive(name):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"model.{name} must be a positive integer, got {v!r}.")
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
      positive(name)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads} "
                       "(grouped-query attention shares each kv head among num_heads/num_kv_heads query heads).")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for rotary embeddings.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"model.{name}={getattr(self, name)!r} must be one of {sorted(DTYPES)}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy={self.remat_policy!r} must be one of {REMAT_POLICIES}.")
    if self.attention_impl not in ("xla", "pallas", "auto"):
      raise ValueError(f"model.attention_impl={self.attention_impl!r} must be 'xla', 'pallas' or 'auto'.")
    if self.rope_scaling is not None:
      from ardiff import rope
      pairs = self.rope_scaling.items() if hasattr(self.rope_scaling, "items") else self.rope_scaling
      try:
        scaling = {str(k): v for k, v in pairs}
      except (TypeError, ValueError):
        raise ValueError(f"model.rope_scaling={self.rope_scaling!r} must be a mapping such as "
                         "{'rope_type': 'llama3', 'factor': 8.0, ...} or None.") from None
      rope.check_scaling(scaling)
      object.__setattr__(self, "rope_scaling", tuple(sorted(scaling.items())))  # hashable, JSON round-trips
    if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
      raise ValueError(f"model.mask_token_id={self.mask_token_id} must lie in [0, vocab_size={self.vocab_size}).")

  @property
  def rope_scaling_dict(self) -> Optional[dict]:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    return dataclass_from_dict(cls, d, "the model config")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    attn = self.embed_dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.qkv_bias:
      attn += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
    attn += self.embed_dim * self.o_bias + 2 * self.head_dim * self.qk_norm
    mlp = 3 * self.embed_dim * self.mlp_dim + (2 * self.mlp_dim + self.embed_dim) * self.mlp_bias
    per_layer = attn + mlp + 2 * self.embed_dim
    embed = self.vocab_size * self.embed_dim * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + embed + self.embed_dim
