"""Every experiment file in configs/ loads and validates; overrides and bad values fail with clear messages."""

import glob
import importlib
import os

import jax
import pytest

from ardiff import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if not p.endswith("__init__.py"))


def test_every_config_file_is_found():
  assert {"default", "ar_shakespeare", "mdlm_shakespeare", "bd3_b4", "bd3_b8", "bd3_b16", "tidar_shakespeare",
          "fastdllm_v2_finetune", "sdar_finetune", "bd3_1b_tpu"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_validates(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  exp = experiment.validate(config, devices=jax.devices())
  assert exp.model.num_params() > 0
  assert "Launch" in importlib.import_module(f"configs.{name}").__doc__ or name == "default"


def test_model_sizes_span_tiny_to_one_billion():
  sizes = {n: experiment.validate(importlib.import_module(f"configs.{n}").get_config()).model.num_params()
           for n in NAMES}
  assert min(sizes.values()) < 2e6 and 0.9e9 < sizes["bd3_1b_tpu"] < 1.5e9


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "num_stepz", 3, "did you mean 'num_steps'"),
    ("model", "embed_dimm", 3, "did you mean 'embed_dim'"),
    ("optimizer", "learning_rat", 1e-3, "did you mean 'learning_rate'"),
    ("optimizer", "warmup_steps", 10_000, "warmup_steps=10000 must be < total_steps"),
    ("objective", "weighting", "ones", "objective.weighting='ones'"),
    ("model", "mask_token_id", 999, "mask_token_id=999 must lie in"),
])
def test_bad_values_are_explained(section, key, value, message):
  config = experiment.base_config()
  with config.unlocked():
    config[section][key] = value
  with pytest.raises(ValueError, match=message):
    experiment.validate(config)


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
