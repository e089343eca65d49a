"""Serving export to serialized StableHLO: artifacts reload and reproduce the library's logits and greedy decode.

Every check runs the *deserialized* ``jax.export.Exported`` functions (symbolic batch, called with batch 1 and 3)
against uncached ``Transformer.apply`` forwards of the same sequences, float32, atol 1e-5.
"""

import functools
import hashlib
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ardiff import masks
from ardiff.config import ModelConfig
from ardiff.export import stablehlo as shlo
from ardiff.model import Transformer, init_params
from ardiff.sampling import ar as ar_lib
from ardiff.sampling import sample_ar

CFG = ModelConfig(vocab_size=32, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  mask_token_id=31, init_std=0.2)  # larger weights: well separated logits for the greedy test
MASK_ID = 31
AR = dict(max_len=16, prompt_len=6, block_size=None)
BD = dict(max_len=24, prompt_len=8, block_size=4)
ATOL = 1e-5
WIDTH = 16  # reference forwards: every row fits in it
pytestmark = pytest.mark.usefixtures("fast_compiles")  # ~20 small compiles dominate this module
RAGGED = {1: {"ar": [6], "bd": [8]}, 3: {"ar": [6, 3, 1], "bd": [8, 4, 8]}}


@pytest.fixture(scope="module")
def params():
  return jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))  # jit: eager init dispatches op by op


@pytest.fixture(scope="module")
def ar_dir(params, tmp_path_factory):
  return shlo.export_serving(params, CFG, str(tmp_path_factory.mktemp("ar")), **AR)


@pytest.fixture(scope="module")
def bd_dir(params, tmp_path_factory):
  # ar_step is the same graph as in the AR export (tested there); leaving it out saves a lowering.
  return shlo.export_serving(params, CFG, str(tmp_path_factory.mktemp("bd")),
                             functions=("prefill", "denoise_step", "write_block"), **BD)


@pytest.fixture(scope="module")
def ar(ar_dir, params):  # loaded once: each Exported object caches its compilations per batch size
  return shlo.load_serving(ar_dir, params)


@pytest.fixture(scope="module")
def bd(bd_dir, params):
  return shlo.load_serving(bd_dir, params)


@jax.jit
def _fwd_causal(params, tokens):
  return Transformer(CFG).apply({"params": params}, tokens, mask=masks.Causal()).logits


@jax.jit
def _fwd_block(params, tokens):
  return Transformer(CFG).apply({"params": params}, tokens, mask=masks.BlockCausal(BD["block_size"])).logits


@functools.partial(jax.jit, static_argnames=("max_len", "mask"))
def _lib_prefill(params, tokens, lengths, *, max_len, mask):
  return ar_lib.prefill(params, Transformer(CFG), tokens, lengths, max_len, mask)


def _prompt(rng, b, p, lengths):
  """Right-padded prompts; the padding is random non-[MASK] tokens, which must not matter. Host-side values stay
  numpy throughout: every eager jnp op would be one more small compile."""
  return rng.integers(0, MASK_ID, (b, p)).astype(np.int32), np.asarray(lengths, np.int32)


def _rows(prompt, lengths, *parts, width=WIDTH):
  """Per row ``[prompt[:len] ; parts...]`` right-padded with 0 to ``width``: the uncached reference input. Trailing
  padding cannot change earlier logits (causal / block-causal with block-aligned rows); one width, one compile."""
  out = np.zeros((prompt.shape[0], width), np.int32)
  for r, n in enumerate(np.asarray(lengths)):
    row = np.concatenate([np.asarray(prompt)[r, :n]] + [np.asarray(p)[r] for p in parts])
    out[r, :len(row)] = row
  return out


def _at(logits, starts, width):
  """``logits[r, starts[r] : starts[r] + width]`` per row."""
  return np.stack([np.asarray(logits)[r, s:s + width] for r, s in enumerate(np.asarray(starts))])


def test_manifest_and_symbolic_batch(ar, bd):
  assert sorted(ar.exported) == ["ar_step", "prefill"]
  assert sorted(bd.exported) == ["denoise_step", "prefill", "write_block"]
  assert list(shlo.step_functions(CFG, max_len=24, block_size=4)) == ["prefill", "ar_step", "denoise_step",
                                                                      "write_block"]  # the default set
  m = bd.manifest
  assert (m["format"], m["format_version"], m["block_size"], m["max_len"], m["prompt_len"]) == (
      shlo.FORMAT, shlo.FORMAT_VERSION, 4, 24, 8)
  assert m["mask_token_id"] == MASK_ID and m["model"]["vocab_size"] == 32 and m["platforms"] == ["cpu"]
  assert m["jax_version"] == jax.__version__
  for name, entry in m["functions"].items():
    assert entry["batch"] == "b" and "symbolic_batch_error" not in entry, name
  wb = m["functions"]["write_block"]
  assert [i["name"] for i in wb["inputs"]] == ["params", "block_tokens", "cache_k", "cache_v", "cache_lengths"]
  assert wb["outputs"][0] == {"name": "logits", "shape": ["b", 4, 32], "dtype": "float32"}
  assert wb["outputs"][1]["shape"] == [2, "b", 24, 2, 8]
  assert [o["name"] for o in m["functions"]["denoise_step"]["outputs"]] == ["logits"]  # read-only
  assert m["params"]["layers/mlp/up_proj/kernel"] == {"shape": [2, 32, 64], "dtype": "float32"}
  assert not isinstance(bd.exported["prefill"].in_avals[-1].shape[0], int)  # symbolic dimension


@pytest.mark.parametrize("b", [1, 3])
def test_prefill_and_ar_step(params, ar, b):
  rng = np.random.default_rng(b)
  prompt, lengths = _prompt(rng, b, AR["prompt_len"], RAGGED[b]["ar"])
  last, k, v, cl = ar.call("prefill", params, prompt, lengths)
  assert last.shape == (b, 32) and k.shape == (2, b, AR["max_len"], 2, 8)
  np.testing.assert_array_equal(cl, lengths)
  np.testing.assert_allclose(last, _at(_fwd_causal(params, prompt), lengths - 1, 1)[:, 0], atol=ATOL, rtol=0)
  # The library's prefill writes the same cache (padding slots included).
  lib_cache, lib_last = _lib_prefill(params, prompt, lengths, max_len=AR["max_len"], mask=masks.Causal())
  np.testing.assert_allclose(k, lib_cache.k, atol=ATOL, rtol=0)
  np.testing.assert_allclose(v, lib_cache.v, atol=ATOL, rtol=0)
  np.testing.assert_allclose(last, lib_last, atol=ATOL, rtol=0)

  token = rng.integers(0, MASK_ID, (b,)).astype(np.int32)
  logits, k, v, cl = ar.call("ar_step", params, token, k, v, cl)
  np.testing.assert_array_equal(cl, lengths + 1)
  ref = _fwd_causal(params, _rows(prompt, lengths, token[:, None]))
  np.testing.assert_allclose(logits, _at(ref, lengths, 1)[:, 0], atol=ATOL, rtol=0)
  # A second step reads the first step's K/V from the returned cache.
  token2 = rng.integers(0, MASK_ID, (b,)).astype(np.int32)
  logits2, *_ = ar.call("ar_step", params, token2, k, v, cl)
  ref = _fwd_causal(params, _rows(prompt, lengths, token[:, None], token2[:, None]))
  np.testing.assert_allclose(logits2, _at(ref, lengths + 1, 1)[:, 0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("b", [1, 3])
def test_denoise_step_and_write_block(params, bd, b):
  bs, p = BD["block_size"], BD["prompt_len"]
  rng = np.random.default_rng(10 + b)
  prompt, lengths = _prompt(rng, b, p, RAGGED[b]["bd"])
  _, k, v, cl = bd.call("prefill", params, prompt, lengths)
  np.testing.assert_array_equal(cl, lengths)
  lib_cache, _ = _lib_prefill(params, prompt, lengths, max_len=BD["max_len"], mask=masks.BlockCausal(bs))
  np.testing.assert_allclose(k, lib_cache.k, atol=ATOL, rtol=0)

  noisy = rng.integers(0, MASK_ID, (b, bs)).astype(np.int32)
  noisy[:, ::2] = MASK_ID  # a partly denoised block
  logits = bd.call("denoise_step", params, noisy, k, v, cl)
  assert logits.shape == (b, bs, 32)
  ref = _fwd_block(params, _rows(prompt, lengths, noisy))
  np.testing.assert_allclose(logits, _at(ref, lengths, bs), atol=ATOL, rtol=0)

  clean = rng.integers(0, MASK_ID, (b, bs)).astype(np.int32)
  logits, k, v, cl = bd.call("write_block", params, clean, k, v, cl)
  np.testing.assert_array_equal(cl, lengths + bs)
  ref = _fwd_block(params, _rows(prompt, lengths, clean))
  np.testing.assert_allclose(logits, _at(ref, lengths, bs), atol=ATOL, rtol=0)

  noisy2 = np.full((b, bs), MASK_ID, np.int32)
  noisy2[:, 1] = clean[:, 0]
  logits = bd.call("denoise_step", params, noisy2, k, v, cl)
  ref = _fwd_block(params, _rows(prompt, lengths, clean, noisy2))
  np.testing.assert_allclose(logits, _at(ref, lengths + bs, bs), atol=ATOL, rtol=0)


def test_greedy_decode_from_artifacts_equals_sample_ar(params, ar):
  prompt, lengths = _prompt(np.random.default_rng(7), 3, AR["prompt_len"], [6, 2, 4])
  new = 8  # the cache needs prompt_len + new - 1 <= max_len slots
  ids = np.arange(CFG.vocab_size)
  pick = lambda logits: np.argmax(np.where(ids == MASK_ID, -np.inf, logits), axis=-1).astype(np.int32)
  last, k, v, cl = ar.call("prefill", params, prompt, lengths)
  toks = [pick(last)]
  for _ in range(new - 1):
    logits, k, v, cl = ar.call("ar_step", params, toks[-1], k, v, cl)
    toks.append(pick(logits))
  ours = np.stack(toks, axis=1)
  ref = sample_ar(params, Transformer(CFG), prompt, lengths, rng=jax.random.key(0), max_new_tokens=new,
                  greedy=True)
  np.testing.assert_array_equal(ours, ref.tokens)
  assert len(np.unique(ours)) > 1  # not a degenerate constant decode


def test_multi_platform_lowering_runs_on_cpu(params, ar, tmp_path):
  out = shlo.export_serving(params, CFG, str(tmp_path / "mp"), platforms=("cpu", "cuda", "tpu"),
                            functions=["prefill"], **AR)
  s = shlo.load_serving(out)
  assert s.exported["prefill"].platforms == ("cpu", "cuda", "tpu")
  assert s.manifest["platforms"] == ["cpu", "cuda", "tpu"] and list(s.exported) == ["prefill"]
  prompt, lengths = _prompt(np.random.default_rng(3), 3, AR["prompt_len"], [5, 6, 1])
  got = s.call("prefill", params, prompt, lengths)
  want = ar.call("prefill", params, prompt, lengths)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=ATOL, rtol=0)


def test_static_batch_export(params, tmp_path):
  out = shlo.export_serving(params, CFG, str(tmp_path / "st"), symbolic_batch=False, batch=2,
                            functions=["prefill"], **AR)
  s = shlo.load_serving(out)
  assert s.manifest["functions"]["prefill"]["batch"] == 2
  assert s.manifest["functions"]["prefill"]["inputs"][1]["shape"] == [2, AR["prompt_len"]]
  prompt, lengths = _prompt(np.random.default_rng(4), 3, AR["prompt_len"], [6, 6, 6])
  with pytest.raises(ValueError, match="Shape mismatch"):
    s.call("prefill", params, prompt, lengths)


def test_serving_export_from_run_takes_block_size_from_objective(params, tmp_path):
  import ml_collections
  from ardiff import experiment
  from ardiff.export import convert
  run = tmp_path / "run"
  c = experiment.base_config()
  c.model = ml_collections.ConfigDict(CFG.to_dict())
  c.objective.kind, c.objective.block_size = "block_diffusion", 4
  # CFG's 32-id vocabulary fits no tokenizer we ship, and the export reads none: a tokenizer file that is not
  # there is not opened at config load (experiment.check_tokenizer).
  c.data.tokenizer = "sentencepiece:" + str(tmp_path / "absent.model")
  os.makedirs(run)
  (run / "config.json").write_text(c.to_json_best_effort(indent=2))
  convert.save_params_checkpoint(params, str(run / "checkpoints"))
  out = shlo.serving_export_from_run(str(run), str(tmp_path / "out"), max_len=24, prompt_len=8,
                                     functions=["denoise_step"])
  s = shlo.load_serving(out, params)
  assert s.manifest["block_size"] == 4 and list(s.exported) == ["denoise_step"]
  assert s.exported["denoise_step"].in_avals[-4].shape[1] == 4


def _copy(src, tmp_path):
  return shutil.copytree(src, str(tmp_path / "copy"))


def _rewrite_manifest(d, fn):
  path = os.path.join(d, shlo.MANIFEST_FILE)
  with open(path) as f:
    m = json.load(f)
  fn(m)
  with open(path, "w") as f:
    json.dump(m, f)


def test_missing_manifest_and_artifact(ar_dir, tmp_path):
  d = _copy(ar_dir, tmp_path)
  os.remove(os.path.join(d, "prefill.stablehlo"))
  with pytest.raises(FileNotFoundError, match=r"prefill\.stablehlo.*missing.*export_serving"):
    shlo.load_serving(d)
  os.remove(os.path.join(d, shlo.MANIFEST_FILE))
  with pytest.raises(FileNotFoundError, match=r"serving\.json not found.*export_serving"):
    shlo.load_serving(d)


def test_manifest_version_mismatch(ar_dir, tmp_path):
  d = _copy(ar_dir, tmp_path)
  _rewrite_manifest(d, lambda m: m.update(format_version=shlo.FORMAT_VERSION + 1))
  with pytest.raises(ValueError, match=r"format_version 2.*reads .*format_version 1"):
    shlo.load_serving(d)


def test_corrupt_artifacts(ar_dir, tmp_path):
  d = _copy(ar_dir, tmp_path)
  path = os.path.join(d, "ar_step.stablehlo")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"ar_step\.stablehlo is corrupt or truncated.*export_serving"):
    shlo.load_serving(d)
  # Bytes that match the manifest's checksum but are not an Exported: the deserializer's error names the file.
  garbage = b"not a flatbuffer" * 8
  with open(path, "wb") as f:
    f.write(garbage)
  _rewrite_manifest(d, lambda m: m["functions"]["ar_step"].update(bytes=len(garbage),
                                                                  sha256=hashlib.sha256(garbage).hexdigest()))
  with pytest.raises(ValueError, match=r"ar_step\.stablehlo could not be deserialized"):
    shlo.load_serving(d)


def test_block_prefill_rejects_unaligned_lengths(params, bd):
  prompt, _ = _prompt(np.random.default_rng(6), 2, BD["prompt_len"], [8, 4])
  for lengths in ([8, 5], [0, 4]):
    with pytest.raises(ValueError, match=re.escape(f"positive multiples of the block size 4, got {lengths}")):
      bd.call("prefill", params, prompt, np.asarray(lengths, np.int32))


def test_wrong_params_are_named(params, ar, ar_dir, tmp_path):
  prompt, lengths = _prompt(np.random.default_rng(5), 1, AR["prompt_len"], [3])
  bad = jax.tree.map(lambda x: x, params)
  bad["layers"]["mlp"]["up_proj"]["kernel"] = np.zeros((2, 32, 65), np.float32)
  with pytest.raises(ValueError, match=r"'layers/mlp/up_proj/kernel' is \[2, 32, 65\] float32.*\[2, 32, 64\]"):
    ar.call("prefill", bad, prompt, lengths)
  with pytest.raises(ValueError, match=r"layers/mlp/up_proj/kernel"):
    shlo.load_serving(ar_dir, params=bad)
  with pytest.raises(ValueError, match=r"layers/mlp/up_proj/kernel"):
    shlo.export_serving(bad, CFG, str(tmp_path / "x"), **AR)
  half = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
  with pytest.raises(ValueError, match=r"bfloat16.*expects .*float32"):
    ar.call("prefill", half, prompt, lengths)
  missing = {k: v for k, v in params.items() if k != "norm"}
  with pytest.raises(ValueError, match=r"'norm/weight' is missing"):
    ar.call("prefill", missing, prompt, lengths)
  extra = {**params, "extra": {"w": np.zeros((2,), np.float32)}}
  with pytest.raises(ValueError, match=r"'extra/w'.*does not expect"):
    ar.call("prefill", extra, prompt, lengths)
  with pytest.raises(KeyError, match="denoise_step"):
    ar.call("denoise_step", params, prompt, lengths)
