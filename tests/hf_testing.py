"""Helpers of the Hugging Face parity tests: random ``transformers`` models (f32, eager attention) and their logits.

``transformers`` and ``torch`` are test-only dependencies (requirements-dev.txt); missing, they fail the tests
loudly instead of skipping them.
"""

import numpy as np


def torch_and_transformers():
  try:
    import torch
    import transformers
  except ImportError as e:  # a hard failure, not a skip: the parity tests are the point of these files
    raise ImportError(f"{e}; the HF parity tests need torch and transformers: "
                      "pip install -r requirements-dev.txt") from e
  return torch, transformers


TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64)
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def random_hf_model(arch: str, seed: int = 0, noise: float = 0.05, **config):
  """A ``transformers`` model of ``arch`` with TINY shapes (overridden by ``config``) and every parameter (norms and
  biases included) perturbed, so that each one matters to the logits."""
  torch, transformers = torch_and_transformers()
  cfg_cls, model_cls = (getattr(transformers, n) for n in CLASSES[arch])
  cfg = cfg_cls(**{**TINY, **config})
  torch.manual_seed(seed)
  model = model_cls(cfg).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(torch.randn_like(p) * noise)
  return model


def hf_logits(model, tokens, attention_mask=None):
  """float32 logits ``[batch, length, vocab]`` of a ``transformers`` model; ``attention_mask`` may be a boolean
  ``[batch, 1, q, k]`` (True = attend), passed as the additive 4-D mask ``transformers`` takes as is."""
  torch, _ = torch_and_transformers()
  kwargs = {}
  if attention_mask is not None:
    m = torch.tensor(np.asarray(attention_mask))
    kwargs["attention_mask"] = torch.where(m, 0.0, torch.finfo(torch.float32).min).to(torch.float32)
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long), **kwargs).logits.float().numpy()


def load_hf(path):
  _, transformers = torch_and_transformers()
  return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                           dtype="float32").eval()
