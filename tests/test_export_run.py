"""`ardiff export` of training runs: portable params directories that `load_run` / `ardiff eval` accept (safetensors
and orbax, EMA, sharded restore on the 8 fake devices), HF exports of runs, and clear refusals on bad inputs."""

import json
import os

import jax
import numpy as np
import optax
import pytest

from ardiff import cli, experiment
from ardiff.export import convert
from ardiff.export import hf as hf_lib
from ardiff.export import main as export_main
from ardiff.export import params as params_lib
from ardiff.checkpoints import checkpointer as checkpoint_lib
from ardiff.checkpoints import params_dir as params_dir_lib
from ardiff.checkpoints import staging as staging_lib
from ardiff.model import init_params
from ardiff.training import evaluate as evaluate_lib
from ardiff.training import main as train_main
from ardiff.training import train_state as train_state_lib


def _config(run_dir, data_dir, *, mesh=(1, 1, 1), tokenizer="byte", vocab=260, mask=258, kind="block_diffusion"):
  c = experiment.base_config()
  c.model.update(vocab_size=vocab, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64,
                 init_std=0.1, mask_token_id=mask)
  c.objective.update(kind=kind, block_size=8, token_shift=True)
  c.data.update(seq_len=32, data_dir=data_dir, tokenizer=tokenizer)
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  c.train.update(run_dir=str(run_dir), batch_size=8)
  return c


def _make_run(run_dir, data_dir, **kw):
  """A run directory as `ardiff train` leaves it (config.json + a train-state checkpoint with an EMA), no training."""
  c = _config(run_dir, data_dir, **kw)
  exp = experiment.validate(c)
  params = init_params(exp.model, jax.random.key(0))
  state = train_state_lib.TrainState.create(params, optax.adam(1e-3), jax.random.key(1), use_ema=True)
  state = state.replace(ema_params=jax.tree.map(lambda x: 0.5 * x, params))  # EMA distinguishable from params
  os.makedirs(run_dir, exist_ok=True)
  with checkpoint_lib.Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
    ckpt.save(7, state, config_dict=c.to_dict(), force=True)
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=2))
  return exp, params, state.ema_params


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
  run_dir = str(tmp_path_factory.mktemp("run") / "bd")
  exp, params, ema = _make_run(run_dir, data_dir)
  return run_dir, exp, params, ema


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_params_dir_evaluates_like_the_run(tmp_path, run, fmt, capsys):
  run_dir, exp, params, _ = run
  out = str(tmp_path / "params")
  assert cli.main(["ardiff", "export", "--run_dir", run_dir, "--to", "params", "--format", fmt, "--out", out]) == 0
  assert params_dir_lib.is_params_dir(out) and os.path.isfile(os.path.join(out, "config.json"))
  assert os.path.exists(os.path.join(out, "params.safetensors" if fmt == "safetensors" else "params"))
  exp2, model, loaded = train_main.load_run(out)
  assert exp2.model == exp.model and exp2.objective == exp.objective and exp2.data == exp.data
  _assert_trees_equal(loaded, params)
  if fmt == "orbax":  # the same parameters as the safetensors case, which runs the (slow) evaluation
    return
  ref = train_main.evaluate_run(run_dir, max_batches=2)
  assert train_main.evaluate_run(out, max_batches=2) == ref  # same params, batches and noise: identical numbers
  capsys.readouterr()
  assert evaluate_lib.main(["ardiff eval", "--run_dir", out, "--batches", "2"]) == 0
  assert f"{ref['nelbo_per_token']:.6g}" in capsys.readouterr().out


def test_ema_export(tmp_path, run):
  run_dir, _, params, ema = run
  out = str(tmp_path / "ema")
  params_lib.export_params(run_dir, out, use_ema=True)
  _assert_trees_equal(train_main.load_run(out)[2], ema)
  _assert_trees_equal(train_main.load_run(out, use_ema=True)[2], ema)
  plain = str(tmp_path / "plain")
  params_lib.export_params(run_dir, plain, format="orbax")
  with pytest.raises(ValueError, match="holds the raw parameters, not the EMA"):
    train_main.load_run(plain, use_ema=True)
  assert json.load(open(os.path.join(out, "model_config.json")))["use_ema"] is True


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_sharded_load_on_8_devices(tmp_path, data_dir, fmt):
  assert len(jax.devices()) == 8
  run_dir = str(tmp_path / "run")
  _, params, _ = _make_run(run_dir, data_dir, mesh=(2, 2, 2))
  out = str(tmp_path / "p")
  params_lib.export_params(run_dir, out, format=fmt)
  exp, _, loaded = train_main.load_run(out)
  _assert_trees_equal(loaded, params)
  q = loaded["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, H, hd]: embed -> fsdp, heads -> tensor
  assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape == (2, 16, 1, 16)
  emb = loaded["embed_tokens"]["embedding"]  # [V, D]: vocab -> tensor, embed -> fsdp
  assert emb.addressable_shards[0].data.shape == (130, 16)
  run_params = train_main.load_run(run_dir)[2]
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(run_params)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)  # same placement as a restore of the run itself


def test_init_from_params_dir_and_layout_check(tmp_path, run):
  from ardiff import sharding
  from ardiff.model import Transformer
  run_dir, exp, params, _ = run
  out = str(tmp_path / "p")
  params_lib.export_params(run_dir, out)
  mesh = sharding.make_mesh(data=8)
  target = exp.model.replace(attention_impl="xla", param_dtype="bfloat16", dtype="bfloat16")  # may differ
  loaded = train_main.load_params(out, Transformer(target), mesh, exp.rules)
  assert loaded["norm"]["weight"].dtype == jax.numpy.bfloat16
  np.testing.assert_array_equal(np.asarray(loaded["norm"]["weight"], np.float32),
                                np.asarray(params["norm"]["weight"].astype(jax.numpy.bfloat16), np.float32))
  for src in (out, run_dir):  # a wrong layout is named, for params dirs and run dirs alike
    with pytest.raises(ValueError, match=r"embed_dim: checkpoint 32 vs config 64"):
      train_main.load_params(src, Transformer(exp.model.replace(embed_dim=64)), mesh, exp.rules)


def test_hf_export_of_run_records_objective_and_loads_in_transformers(tmp_path, run):
  run_dir, exp, params, _ = run
  out = str(tmp_path / "hf")
  export_main.main(["ardiff export", "--run_dir", run_dir, "--to", "hf", "--out", out])
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["ardiff"] == {
      "objective": "block_diffusion", "seq_len": 32, "tokenizer": "byte", "block_size": 8, "token_shift": True,
      "special_tokens": {"bos": 256, "eos": 257, "mask": 258}, "mask_token_id": 258,
      "decoding": {"sampler": "block_diffusion", "block_size": 8, **export_main.DECODING_DEFAULTS["block_diffusion"]}}
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (256, 257, 260)
  cfg2, back = hf_lib.import_hf(out)
  assert cfg2 == exp.model
  _assert_trees_equal(back, params)
  import torch  # requirements-dev.txt
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype="float32")
  tokens = np.random.default_rng(0).integers(0, 259, size=(2, 9))
  with torch.no_grad():
    hf_logits = model.eval()(torch.tensor(tokens)).logits.numpy()
  from ardiff import masks
  from ardiff.model import Transformer
  ours = Transformer(exp.model).apply({"params": params}, tokens, mask=masks.Causal()).logits
  np.testing.assert_allclose(hf_logits, np.asarray(ours), atol=1e-4, rtol=0)


def _word_tokenizer(path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(40)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(path))
  return str(path)


def test_hf_tokenizer_travels_through_export_and_convert(tmp_path, data_dir):
  # 43 real tokens, no [MASK]: ardiff appends a virtual one (id 43); the model pads its vocabulary to 48.
  tok = _word_tokenizer(tmp_path / "words.json")
  run_dir = str(tmp_path / "ar")
  _make_run(run_dir, data_dir, tokenizer="hf:" + tok, vocab=48, mask=None, kind="ar")
  hf = str(tmp_path / "hf")
  export_main.export_run_to_hf(run_dir, hf)
  cfg = json.load(open(os.path.join(hf, "config.json")))
  assert cfg["ardiff"]["tokenizer"] == "tokenizer.json" and "mask_token_id" not in cfg["ardiff"]
  assert cfg["ardiff"]["special_tokens"] == {"bos": 1, "eos": 2, "mask": 43} and cfg["ardiff"]["objective"] == "ar"
  assert open(os.path.join(hf, "tokenizer.json")).read() == open(tok).read()
  pdir = str(tmp_path / "params")  # the params dir refers to its own copy, relative to the directory
  params_lib.export_params(run_dir, pdir)
  assert json.load(open(os.path.join(pdir, "config.json")))["data"]["tokenizer"] == "hf:words.json"
  assert train_main.load_run(pdir)[0].data.tokenizer == "hf:" + os.path.join(pdir, "words.json")

  bd = str(tmp_path / "bd")
  convert.convert_hf_to_block_diffusion(hf, bd, block_size=4, recipe="bd3")
  exp, _, params = train_main.load_run(bd)
  assert exp.model.mask_token_id == 43 and exp.model.vocab_size == 48
  assert exp.data.tokenizer == "hf:" + os.path.join(bd, "tokenizer.json")
  assert json.load(open(os.path.join(bd, "conversion.json")))["mean_initialised_rows"] == [43]
  _, src = hf_lib.import_hf(hf)
  emb, old = np.asarray(params["embed_tokens"]["embedding"]), np.asarray(src["embed_tokens"]["embedding"])
  np.testing.assert_allclose(emb[43], old.mean(0), rtol=1e-6, atol=1e-7)  # the padding row that became [MASK]
  np.testing.assert_array_equal(np.delete(emb, 43, 0), np.delete(old, 43, 0))


# ------------------------------------------------------------------------------------------ refusals and errors
def test_populated_output_is_refused_before_writing(tmp_path, run):
  run_dir = run[0]
  out = tmp_path / "out"
  out.mkdir()
  (out / "config.json").write_text("{}")
  (out / "stale.bin").write_text("x")
  for to in ("hf", "params"):
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
      export_main.main(["ardiff export", "--run_dir", run_dir, "--to", to, "--out", str(out)])
  with pytest.raises(FileExistsError, match="not empty"):
    convert.convert_run_to_block_diffusion(run_dir, str(out), block_size=4)
  assert sorted(os.listdir(out)) == ["config.json", "stale.bin"] and (out / "config.json").read_text() == "{}"
  export_main.main(["ardiff export", "--run_dir", run_dir, "--to", "hf", "--out", str(out), "--overwrite"])
  # replaced as a whole: no stale files
  assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
  src = tmp_path / "src"
  src.mkdir()
  (src / "main.py").write_text("")
  with pytest.raises(FileExistsError, match="not an earlier export"):
    staging_lib.check_output_dir(src, overwrite=True)


def test_failed_export_leaves_nothing(tmp_path, run):
  _, exp, params, _ = run
  broken = {k: v for k, v in params.items() if k != "norm"}
  for fn in (lambda o: hf_lib.export_hf(broken, exp.model, o), lambda o: params_dir_lib.save_params_dir(
      broken, exp.model, o)):
    with pytest.raises(ValueError, match=r"missing \['norm/weight'\]"):
      fn(str(tmp_path / "x"))
  assert os.listdir(tmp_path) == []  # not even a temporary directory


def test_corrupt_params_dir_errors(tmp_path, run):
  from safetensors.numpy import load_file, save_file
  run_dir = run[0]
  out = str(tmp_path / "p")
  params_lib.export_params(run_dir, out)
  f = os.path.join(out, "params.safetensors")
  tensors = load_file(f)
  save_file({k: v for k, v in tensors.items() if k != "norm/weight"}, f)
  with pytest.raises(ValueError, match=r"missing tensors \['norm/weight'\]"):
    train_main.load_run(out)
  tensors["norm/weight"] = np.ones(7, np.float32)
  save_file(tensors, f)
  with pytest.raises(ValueError, match=r"'norm/weight' has shape \(7,\), the model config needs \(32,\)"):
    train_main.load_run(out)
  for size in (100, os.path.getsize(f) // 2):  # a cut header, then cut tensor data
    save_file(dict(tensors, **{"norm/weight": np.ones(32, np.float32)}), f)
    os.truncate(f, size)
    with pytest.raises(ValueError, match="params.safetensors is damaged .*export the run again"):
      train_main.load_run(out)
  os.remove(f)
  with pytest.raises(FileNotFoundError, match="params.safetensors not found"):
    train_main.load_run(out)
  os.remove(os.path.join(out, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    train_main.load_run(out)
  with pytest.raises(FileNotFoundError, match="is not a params directory"):
    params_dir_lib.load_params_dir(str(tmp_path))


def test_convert_rejects_bad_block_size_before_writing(tmp_path, run):
  out = tmp_path / "bd"
  with pytest.raises(ValueError, match="block size 5 does not divide data.seq_len=32; pass --seq-len 30"):
    convert.convert_run_to_block_diffusion(run[0], str(out), block_size=5)
  with pytest.raises(ValueError, match="recipe='llada'"):
    convert.convert_run_to_block_diffusion(run[0], str(out), block_size=4, recipe="llada")
  assert not out.exists() and os.listdir(tmp_path) == []


def test_stablehlo_hook_passes_the_run_and_flags(tmp_path, run, monkeypatch):
  import sys
  import types
  calls = []

  def serving_export_from_run(run_dir, out_dir, **kw):  # stands in for ardiff/export/stablehlo.py
    calls.append((run_dir, kw))
    with open(os.path.join(out_dir, "serving.json"), "w") as f:
      f.write("{}")
    return out_dir

  monkeypatch.setitem(sys.modules, "ardiff.export.stablehlo",
                      types.SimpleNamespace(serving_export_from_run=serving_export_from_run))
  out = tmp_path / "s"
  cli.main(["ardiff", "export", "--run_dir", run[0], "--to", "stablehlo", "--out", str(out), "--max_len", "64",
            "--prompt_len", "8", "--platforms", "cpu,tpu", "--ema"])
  assert calls == [(run[0], dict(use_ema=True, max_len=64, prompt_len=8, platforms=("cpu", "tpu")))]
  assert os.listdir(out) == ["serving.json"]
  for max_len, prompt_len in ((0, 4), (8, 0), (8, 16)):
    rc = cli.main(["ardiff", "export", "--run_dir", run[0], "--to", "stablehlo", "--out", str(tmp_path / "t"),
                   "--max_len", str(max_len), "--prompt_len", str(prompt_len)])
    assert rc == 2 and not os.path.exists(tmp_path / "t")
  assert len(calls) == 1
