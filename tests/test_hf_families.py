"""Published diffusion LMs as ardiff runs: SDAR, Fast-dLLM v2, Dream and LLaDA checkpoints, each written in its own
on-disk layout (config.json keys, safetensors names) from a random ``transformers`` model of its base architecture.

For each family: ``ardiff convert --from-hf DIR`` imports it with the family's block size, [MASK] id and token shift;
ardiff's forward under the family's mask equals ``transformers``' forward of the base architecture given the same
mask as a 4-D attention mask (f32, 1e-4; token-shifted where the family shifts); ``ardiff sample`` decodes the
imported run with the family's default sampler and no flags. Also: the offline HF-cache resolver, chat templates
rendered as ``apply_chat_template`` renders them, and clear refusals.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from ardiff import cli, masks
from ardiff.checkpoints.run_dir import load_run
from ardiff.export import families, hf_cache
from ardiff.export.hf_config import UnsupportedCheckpointError
from ardiff.model import Transformer
from ardiff.sampling import chat as chat_lib
from ardiff.sampling.commit_rules import shift_logits
from tests.hf_testing import hf_logits, random_hf_model, torch_and_transformers

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-dominated, see conftest.py

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2; the family's [MASK] is id 3
WORDS = ["user", "assistant", "system", "You", "are", "helpful."] + [f"w{i}" for i in range(87)]
CHATML = ("{%- if messages[0]['role'] != 'system' %}\n"
          "  {{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}\n"
          "{%- endif %}\n"
          "{% for message in messages %}\n"
          "  {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>' + '\\n' }}\n"
          "{% endfor %}\n"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SEQ_LEN = 16
# family -> (base architecture, its transformers config changes, the family's own config.json entries)
CASES = {
    "sdar": ("qwen3", dict(head_dim=16), {"architectures": ["SDARForCausalLM"], "model_type": "sdar",
                                           "block_size": 4, "mask_token_id": 3}),
    # Fast-dLLM v2 configs carry no mask id: it is the tokenizer's |<MASK>|
    "fast_dllm_v2": ("qwen2", {}, {"architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen",
                                   "bd_size": 4}),
    "dream": ("qwen2", {}, {"architectures": ["DreamModel"], "model_type": "Dream", "mask_token_id": 3}),
    "llada": ("llama", {}, {}),  # written in LLaDA's own layout by _write_llada
}


def _write_tokenizer(d, mask_token):
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {t: i for i, t in enumerate(SPECIALS + [mask_token] + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(SPECIALS + [mask_token])
  tok.save(os.path.join(d, "tokenizer.json"))
  with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "bos_token": None}, f)


def _write_llada(model, d):
  """The LLaDA layout: OLMo-style config keys, model.transformer.* tensor names."""
  from safetensors.torch import save_file
  c = model.config
  config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "auto_map": {"AutoModel": "modeling_llada.X"},
            "d_model": c.hidden_size, "n_heads": c.num_attention_heads, "n_kv_heads": c.num_key_value_heads,
            "n_layers": c.num_hidden_layers, "mlp_hidden_size": c.intermediate_size, "vocab_size": c.vocab_size,
            "embedding_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_parameters[
                "rope_theta"], "max_sequence_length": 4096, "weight_tying": False, "block_type": "llama",
            "activation_type": "silu", "layer_norm_type": "rms", "alibi": False, "rope": True, "include_bias": False,
            "attention_layer_norm": False, "mask_token_id": 3, "eos_token_id": 2}
  tensors = {families.llada_name(k): v.contiguous() for k, v in model.state_dict().items()}
  assert all(k.startswith("model.transformer.") for k in tensors)
  save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(config, f)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  out = {}
  for name, (base, changes, own) in CASES.items():
    d = str(tmp_path_factory.mktemp(name))
    # 100 rows for a 97-token tokenizer: padded embeddings, as the published checkpoints have
    model = random_hf_model(base, vocab_size=100, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                            **changes)
    if name == "llada":
      _write_llada(model, d)
    else:
      model.save_pretrained(d, safe_serialization=True)
      with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
      config.update(own, auto_map={"AutoModelForCausalLM": f"modeling_{name}.X"})
      with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    _write_tokenizer(d, families.FAMILIES[name].mask_token)
    out[name] = (d, model)
  return out


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
  out = {}
  for name, (d, _) in checkpoints.items():
    run = str(tmp_path_factory.mktemp(f"run_{name}") / "run")
    assert cli.main(["ardiff", "convert", "--from-hf", d, "--out", run, "--seq-len", str(SEQ_LEN)]) == 0
    out[name] = run
  return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_family_imports_and_matches_transformers_under_its_mask(checkpoints, runs, name):
  fam = families.FAMILIES[name]
  d, model = checkpoints[name]
  exp, _, params = load_run(runs[name])
  block = SEQ_LEN if fam.bidirectional else 4
  assert (exp.objective.block_size, exp.model.mask_token_id, exp.objective.token_shift) == (block, 3,
                                                                                           fam.token_shift)
  with open(os.path.join(runs[name], "conversion.json")) as f:
    record = json.load(f)
  assert record["family"] == name and record["decoding"]["strategy"] == fam.decoding["strategy"]
  tokens = np.random.default_rng(2).integers(4, 97, size=(2, SEQ_LEN)).astype(np.int32)
  mask = masks.Full() if fam.bidirectional else masks.BlockCausal(block)
  got = np.asarray(jax.jit(lambda p, t: Transformer(exp.model).apply({"params": p}, t, mask=mask).logits)(
      params, tokens))
  q = np.arange(SEQ_LEN)
  allowed = np.broadcast_to(np.asarray(mask.predicate(q[:, None], q[None, :])), (2, 1, SEQ_LEN, SEQ_LEN))
  want = hf_logits(model, tokens, attention_mask=allowed)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  if fam.token_shift:  # the family reads position i's prediction off row i-1 (Dream: logits shifted right by one)
    want_shifted = np.concatenate([want[:, :1], want[:, :-1]], axis=1)
    np.testing.assert_allclose(np.asarray(shift_logits(got, got[:, 0])), want_shifted, atol=1e-4, rtol=0)
  causal = hf_logits(model, tokens)  # negative control: the base model's own causal mask is not the family's
  assert np.abs(causal - want).max() > 1e-3


@pytest.mark.parametrize("name", sorted(CASES))
def test_imported_family_samples_with_its_defaults(runs, capsys, name):
  """No flags but the prompt; SDAR's run is asked a --chat question (its template, its end token)."""
  prompt = ["--chat", "w5 w6"] if name == "sdar" else ["--prompt", "w5 w6 w7"]
  assert cli.main(["ardiff", "sample", "--checkpoint", runs[name], *prompt, "--no-warmup"]) == 0
  out = capsys.readouterr().out
  assert "sampler=block_diffusion" in out and "NFE=" in out
  if name == "sdar":
    assert out.startswith("system You are helpful. user w5 w6 assistant")  # the rendered template is the prompt


def test_chat_prompt_matches_transformers_apply_chat_template(checkpoints, runs):
  _, transformers = torch_and_transformers()
  d, _ = checkpoints["sdar"]
  tok = transformers.AutoTokenizer.from_pretrained(d)
  for messages in ([{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "w1 w2 "},
                    {"role": "assistant", "content": "w3"}, {"role": "user", "content": "w4"}],
                   [{"role": "user", "content": "w9"}]):
    for gen in (True, False):
      want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      template, specials = chat_lib.load_chat_template(d)
      assert chat_lib.render_chat(template, messages, specials=specials, add_generation_prompt=gen) == want
  text, end = chat_lib.chat_prompt(runs["sdar"], "w5 w6")  # the run directory carries tokenizer_config.json
  assert end == "<|im_end|>" and text.endswith("<|im_start|>assistant\n")


def test_hf_cache_resolution_is_offline(checkpoints, tmp_path, monkeypatch):
  hub = tmp_path / "hf_home" / "hub"
  repo = hub / "models--dllm-org--tiny-sdar"
  snap = repo / "snapshots" / "abc123"
  shutil.copytree(checkpoints["sdar"][0], snap)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("abc123")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  assert hf_cache.resolve_model_dir("dllm-org/tiny-sdar") == str(snap)
  assert hf_cache.resolve_model_dir("dllm-org/tiny-sdar@abc") == str(snap)  # a commit prefix
  assert hf_cache.resolve_model_dir(str(snap)) == str(snap)  # a directory stays a directory
  with pytest.raises(hf_cache.UsageError, match=r"not in the local Hugging Face cache \(looked in .*hf_home/hub"):
    hf_cache.resolve_model_dir("dllm-org/missing")
  with pytest.raises(hf_cache.UsageError, match="revision 'v9' of dllm-org/tiny-sdar is not in the local cache"):
    hf_cache.resolve_model_dir("dllm-org/tiny-sdar@v9")
  run = str(tmp_path / "run")
  assert cli.main(["ardiff", "convert", "--from-hf", "dllm-org/tiny-sdar", "--out", run, "--seq-len", "8"]) == 0
  assert json.load(open(os.path.join(run, "conversion.json")))["family"] == "sdar"


def test_refusals_name_what_is_supported(checkpoints, tmp_path, capsys):
  with pytest.raises(UnsupportedCheckpointError, match="is not a model ardiff knows; supported: LlamaForCausalLM.*"
                                                       "DreamModel"):
    families.detect({"architectures": ["MysteryDLM"], "auto_map": {"AutoModel": "m.X"}})
  llada = json.load(open(os.path.join(checkpoints["llada"][0], "config.json")))
  with pytest.raises(UnsupportedCheckpointError, match="LLaDA with alibi=True"):
    families.base_config(families.FAMILIES["llada"], dict(llada, alibi=True))
  with pytest.raises(ValueError, match=r"\[MASK\] id 126336 \(llada's published \[MASK\] id\) lies outside"):
    families.mask_id(families.FAMILIES["llada"], {}, vocab_size=97)
  assert cli.main(["ardiff", "convert", "--from-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
  assert "no such directory" in capsys.readouterr().err


def test_compile_from_hf_builds_the_imported_run_config(checkpoints, capsys):
  """``ardiff compile --from_hf`` reaches the imported-checkpoint compile (its 8B figures are in docs/pretrained.md;
  the compile itself is tests/test_aot.py's); the config it compiles is the one ``convert`` writes."""
  from ardiff import experiment
  from ardiff.export import hf_compile
  assert cli.main(["ardiff", "compile", "--from_hf", checkpoints["dream"][0], "--help"]) == 0
  assert "will an imported checkpoint sample on a TPU slice" in capsys.readouterr().out
  exp = experiment.validate(hf_compile.experiment_for_hf(checkpoints["fast_dllm_v2"][0], seq_len=64))
  assert (exp.objective.block_size, exp.objective.token_shift, exp.model.mask_token_id) == (4, True, 3)
  assert exp.model.param_dtype == "bfloat16" and exp.mesh.fsdp == -1


def test_family_run_exports_to_its_base_architecture(checkpoints, runs, tmp_path):
  """``ardiff export --to hf`` of an imported SDAR run: a Qwen3 directory with the family's decoding and chat
  template, whose logits equal the original checkpoint's."""
  from tests.hf_testing import load_hf
  out = str(tmp_path / "hf")
  assert cli.main(["ardiff", "export", "--run_dir", runs["sdar"], "--to", "hf", "--out", out]) == 0
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["architectures"] == ["Qwen3ForCausalLM"] and config["ardiff"]["decoding"]["strategy"] == "dynamic"
  assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
  tokens = np.random.default_rng(3).integers(4, 97, size=(1, 12))
  np.testing.assert_allclose(hf_logits(load_hf(out), tokens), hf_logits(checkpoints["sdar"][1], tokens), atol=1e-4,
                             rtol=0)
