"""Every experiment file in configs/ (with its arguments) loads and validates; the typed sections hold the one set
of defaults; overrides and bad values fail with clear messages; configs resolve from any directory, also from an
installed wheel."""

import dataclasses
import glob
import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import jax
import ml_collections
import pytest

from ardiff import cli_flags, experiment, sections, sharding
from ardiff.errors import UsageError
from ardiff.objectives.recipes import RECIPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if not p.endswith("__init__.py"))
# Every file, plus the arguments the docs use.
SPECS = [f"configs/{n}.py" for n in NAMES] + [
    "configs/bd3.py:block_size=8", "configs/bd3.py:block_size=16", "configs/finetune.py:recipe=sdar",
    "configs/finetune.py:recipe=bd3,block_size=8", "configs/finetune.py:recipe=fastdllm_v2,block_size=16"]


def _load(spec):
  return cli_flags.load_config_file(os.path.join(ROOT, spec))


def test_every_config_file_is_found():
  assert {"default", "ar_shakespeare", "mdlm_shakespeare", "bd3", "tidar_shakespeare", "finetune",
          "bd3_1b_tpu"} <= set(NAMES)


@pytest.mark.parametrize("spec", SPECS)
def test_config_validates(spec):
  exp = experiment.validate(_load(spec), devices=jax.devices())
  assert exp.model.num_params() > 0
  name = spec.split(":")[0][len("configs/"):-3]
  assert "Launch" in importlib.import_module(f"configs.{name}").__doc__ or name == "default"


def test_model_sizes_span_tiny_to_one_billion():
  sizes = {n: experiment.validate(_load(f"configs/{n}.py")).model.num_params() for n in NAMES}
  assert min(sizes.values()) < 2e6 and 0.9e9 < sizes["bd3_1b_tpu"] < 1.5e9


# ------------------------------------------------------------------------------------------- one set of defaults
def test_base_config_is_derived_from_the_section_defaults():
  c = experiment.base_config()
  exp = experiment.validate(c)
  assert exp.data == sections.DataConfig() and exp.mesh == sections.MeshConfig()
  assert exp.train == sections.TrainConfig()
  assert exp.optimizer == sections.OptimizerConfig(total_steps=exp.train.num_steps)
  # the values runs use (formerly base_config's; the standalone OptimizerConfig/DataConfig had others)
  opt, data = sections.OptimizerConfig(), sections.DataConfig()
  assert (opt.learning_rate, opt.b2, opt.weight_decay, opt.warmup_steps) == (3e-3, 0.99, 0.01, 50)
  assert data.seq_len == 128 == c.data.seq_len
  from ardiff.data import pipeline
  from ardiff.training import optimizer
  assert pipeline.DataConfig is sections.DataConfig and optimizer.OptimizerConfig is sections.OptimizerConfig
  assert pipeline._cfg_get(None, "seq_len") == 128


def test_pipeline_options_are_experiment_options():
  c = experiment.base_config()
  c.data.pack_bins = 32
  c.data.prefetch = 4
  c.data.shuffle_buffer = 16
  exp = experiment.validate(c)
  assert (exp.data.pack_bins, exp.data.prefetch, exp.data.shuffle_buffer) == (32, 4, 16)


def test_config_json_of_earlier_versions_still_loads():
  # the layout written by earlier versions (no pack_bins/prefetch/shuffle_buffer; rules as JSON lists)
  old = {"name": "bd3_shakespeare_b4", "model": dataclasses.asdict(experiment.ModelConfig(mask_token_id=258)),
         "objective": dataclasses.asdict(experiment.ObjectiveConfig()),
         "data": dict(name="shakespeare", data_dir="~/.cache/ardiff/tfds", text_key="text", tokenizer="byte",
                      seq_len=128, num_threads=2, train_split="train", eval_split="validation"),
         "mesh": dict(data=-1, fsdp=1, tensor=1), "rules": [list(r) for r in sharding.DEFAULT_RULES],
         "optimizer": dict(learning_rate=3e-3, schedule="cosine", warmup_steps=50, b1=0.9, b2=0.99, eps=1e-8,
                           weight_decay=0.01, clip_norm=1.0, end_lr_ratio=0.1, grad_accum_steps=1, ema_decay=0.0),
         "train": dict(run_dir="runs/default", batch_size=16, num_steps=300, seed=0, log_every=10, eval_every=100,
                       eval_batches=8, save_every=100, keep_checkpoints=2, num_samples=4, sample_tokens=128,
                       resume=True, init_from="")}
  exp = experiment.validate(ml_collections.ConfigDict(json.loads(json.dumps(old))))
  assert exp == dataclasses.replace(experiment.validate(experiment.base_config()), raw=exp.raw)


def test_make_mesh_takes_the_experiment():
  c = experiment.base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, -1, 2
  exp = experiment.validate(c)
  assert dict(sharding.make_mesh(exp).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh(exp.mesh, devices=jax.devices()[:4]).shape) == {"data": 2, "fsdp": 1, "tensor": 2}


# ------------------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("section,key,value,message", [
    ("train", "num_stepz", 3, "did you mean 'num_steps'"),
    ("model", "embed_dimm", 3, "did you mean 'embed_dim'"),
    ("optimizer", "learning_rat", 1e-3, "did you mean 'learning_rate'"),
    ("data", "pack_binz", 3, "did you mean 'pack_bins'"),
    ("mesh", "tensr", 3, "did you mean 'tensor'"),
    ("optimizer", "warmup_steps", 10_000, "warmup_steps=10000 must be < train.num_steps=300"),
    ("optimizer", "total_steps", 10, "derived from train.num_steps"),
    ("optimizer", "schedule", "linear", r"optimizer.schedule='linear' must be one of \('cosine', 'constant'\)"),
    ("data", "tokenizer", "bpe:/x.model", r"unknown tokenizer kind 'bpe'; use one of 'byte'"),
    ("data", "seq_len", "128", r"data.seq_len='128' must be an int"),
    ("train", "resume", 1, r"train.resume=1 must be a bool"),
    ("objective", "block_size", "4", r"objective.block_size='4' must be an int"),
    ("model", "tie_embeddings", "yes", r"model.tie_embeddings='yes' must be a bool"),
    ("mesh", "fsdp", -1, r"mesh axes data=-1, fsdp=-1: at most one axis may be -1"),
    ("mesh", "tensor", 0, r"mesh.tensor=0 must be a positive size or -1"),
    ("objective", "weighting", "ones", "objective.weighting='ones'"),
    ("objective", "kind", "mdlm", "objective.kind='mdlm' must be one of"),
    ("model", "mask_token_id", 999, "mask_token_id=999 must lie in"),
    ("train", "num_samples", -1, r"train.num_samples=-1 must be >= 0"),
    ("train", "sample_top_p", 0.0, r"train.sample_top_p=0.0 in \(0, 1\]"),
])
def test_bad_values_are_explained(section, key, value, message):
  d = experiment.base_config().to_dict()  # a plain dict: e.g. JSON may hold a "128" that a ConfigDict would refuse
  d[section][key] = value
  config = ml_collections.ConfigDict(d)
  with pytest.raises(ValueError, match=message):
    experiment.validate(config)


def test_sections_check_themselves_on_construction():
  with pytest.raises(ValueError, match=r"optimizer.b2=1.5 and|optimizer.b1=0.9 and optimizer.b2=1.5"):
    sections.OptimizerConfig(b2=1.5)
  with pytest.raises(ValueError, match="data.prefetch=0 must be >= 1"):
    sections.DataConfig(prefetch=0)
  with pytest.raises(ValueError, match="warmup_steps=50 must be < total_steps=10"):
    sections.OptimizerConfig(total_steps=10)
  assert sections.OptimizerConfig(learning_rate=1).learning_rate == 1.0  # an int is a fine float
  with pytest.raises(ValueError, match="Unknown key.*'seqlen' \\(did you mean 'seq_len'\\?\\)"):
    sections.DataConfig.from_dict({"seqlen": 64})


def test_mesh_divisibility_is_checked_against_devices():
  config = experiment.base_config()
  config.train.batch_size = 6
  with pytest.raises(ValueError, match="not divisible by the data-parallel size"):
    experiment.validate(config, devices=jax.devices()[:4])
  config = experiment.base_config()
  config.mesh.tensor = 8
  config.mesh.data = 1
  with pytest.raises(ValueError, match="not divisible by mesh.tensor=8"):
    experiment.validate(config, devices=jax.devices()[:8])


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "num_steps", -5, r"train.num_steps=-5 must be >= 1"),  # named itself, not the derived total_steps
    ("optimizer", "learning_rate", float("nan"), r"optimizer.learning_rate=nan is not a finite number"),
    ("optimizer", "b2", float("inf"), r"optimizer.b2=inf is not a finite number"),
    ("model", "rope_theta", float("nan"), r"model.rope_theta=nan is not a finite number"),
    ("objective", "noise_eps", float("-inf"), r"objective.noise_eps=-inf is not a finite number"),
])
def test_negative_steps_and_non_finite_hyperparameters_are_rejected_at_load_time(section, key, value, message):
  config = experiment.base_config()
  config[section][key] = value
  with pytest.raises(ValueError, match=message):
    experiment.validate(config)


# ---------------------------------------------------------------------------------------------- config arguments
@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_bd3_block_size_argument(block_size):
  exp = experiment.validate(_load(f"configs/bd3.py:block_size={block_size}"))
  assert exp.objective.block_size == block_size and exp.train.run_dir == f"runs/bd3_b{block_size}"
  assert experiment.validate(_load("configs/bd3.py")).objective.block_size == 4


@pytest.mark.parametrize("spec,message", [
    ("configs/bd3.py:block_sise=8", r"unknown argument 'block_sise' \(did you mean 'block_size'\?\)"),
    ("configs/bd3.py:block_size=eight", r"block_size='eight' is not an integer"),
    ("configs/bd3.py:8", r"'8' is not KEY=VALUE; use configs/bd3.py:block_size=..."),
    ("configs/finetune.py:recipe=llada", r"recipe='llada' is not a recipe; use one of bd3, fastdllm_v2, sdar"),
    ("configs/finetune.py:recepe=sdar", r"did you mean 'recipe'"),
])
def test_bad_config_arguments_are_explained(spec, message):
  with pytest.raises(ValueError, match=message):
    _load(spec)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_finetune_recipes_come_from_the_library(recipe):
  exp = experiment.validate(_load(f"configs/finetune.py:recipe={recipe},block_size=8"))
  assert {k: getattr(exp.objective, k) for k in RECIPES[recipe]} == RECIPES[recipe]
  assert exp.objective.block_size == 8 and exp.train.init_from == "runs/ar_shakespeare"
  assert (exp.optimizer.learning_rate, exp.optimizer.warmup_steps) == (1e-3, 10)


def test_finetune_from_a_converted_run(tmp_path):
  c = experiment.base_config()
  c.objective.update(RECIPES["sdar"])
  c.objective.block_size = 8
  converted = tmp_path / "conv"
  converted.mkdir()
  (converted / "config.json").write_text(c.to_json_best_effort())
  exp = experiment.validate(_load(f"configs/finetune.py:from={converted}"))
  assert exp.objective == experiment.validate(c).objective  # the converted run's block size and recipe
  assert exp.train.init_from == str(converted) and exp.train.run_dir == f"{converted}_ft"
  exp = experiment.validate(_load(f"configs/finetune.py:from={converted},recipe=fastdllm_v2,block_size=4"))
  assert exp.objective.token_shift and exp.objective.block_size == 4
  with pytest.raises(FileNotFoundError, match="configs/finetune.py:from=DIR"):
    _load(f"configs/finetune.py:from={tmp_path / 'missing'}")


def test_importing_a_config_stays_light():
  code = ("import sys, configs.default, configs.bd3, configs.finetune\n"
          "heavy = sorted({m.split('.')[0] if not m.startswith('flax.training') else 'flax.training'\n"
          "  for m in sys.modules if m.split('.')[0] in ('orbax', 'optax', 'grain', 'tensorflow_datasets',\n"
          "  'tensorflow') or m.startswith('flax.training')})\n"
          "print(heavy)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------- config resolution
def test_config_paths_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli_flags.load_config_file("configs/bd3.py:block_size=8").name == "bd3_b8"
  assert cli_flags.load_config_file("bd3.py").name == "bd3_b4"
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "bd3.py").write_text(
      "from ardiff.experiment import base_config\n"
      "def get_config(arg=None):\n  c = base_config()\n  c.name = 'local:' + str(arg)\n  return c\n")
  assert cli_flags.load_config_file("configs/bd3.py:x").name == "local:x"  # the cwd comes first
  with pytest.raises(UsageError, match=r"no such config file.*Shipped configs: .*configs/bd3.py.*configs/finetune.py"):
    cli_flags.load_config_file("configs/bd3_b8.py")


def test_wheel_runs_from_elsewhere(tmp_path):
  """A built wheel, unpacked on PYTHONPATH with the cwd elsewhere, finds its configs (no network)."""
  src = tmp_path / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("ardiff", "kernels_pallas", "configs"):
    shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
  for name in ("pyproject.toml", "README.md", "requirements.txt"):
    shutil.copy(os.path.join(ROOT, name), src / name)
  run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
  built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", ".",
              "-w", str(tmp_path / "dist"), cwd=src)
  assert built.returncode == 0, built.stdout + built.stderr
  (wheel,) = (tmp_path / "dist").glob("ardiff-*.whl")
  site = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(site)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {**os.environ, "PYTHONPATH": str(site)}
  helped = run(sys.executable, "-m", "ardiff", "train", "--help", cwd=elsewhere, env=env)
  assert helped.returncode == 0 and "--config FILE[:ARG]" in helped.stdout, helped.stderr
  # the config is found inside the install and loaded with its argument: validation then names its block size
  loaded = run(sys.executable, "-m", "ardiff", "train", "--config", "configs/bd3.py:block_size=3", cwd=elsewhere,
               env=env)
  assert loaded.returncode == 2 and "objective.block_size=3 must divide the sequence length 128" in loaded.stderr, (
      loaded.stdout + loaded.stderr)
  missing = run(sys.executable, "-m", "ardiff", "train", "--config", "configs/nope.py", cwd=elsewhere, env=env)
  assert missing.returncode == 2 and f"and in {site / 'configs'}" in missing.stderr  # the wheel's, not the repo's
  assert "Shipped configs: configs/ar_shakespeare.py, configs/bd3.py" in missing.stderr
