"""`python -m ardiff ...`: --help for every command, expected errors as one `error:` paragraph with exit 2 (a traceback
only with --debug / ARDIFF_DEBUG=1), config overrides with did-you-mean, and TPU topology names checked up front.

Run in-process through ardiff.cli.main (importing jax per subprocess is slow); two subprocess checks cover the
real exit status and stderr of `python -m ardiff`.
"""

import os
import subprocess
import sys
import time

import pytest

from ardiff import cli, cli_flags
from ardiff.errors import UsageError
from ardiff.training import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(capsys, *args):
  rc = cli.main(["ardiff", *args])
  out, err = capsys.readouterr()
  return rc, out, err


def assert_usage_error(rc, err, *needles):
  assert rc == 2, err
  assert err.startswith("error: ") and "Traceback" not in err, err
  assert len(err.strip().splitlines()) == 1, err  # one paragraph
  for needle in needles:
    assert needle in err, err


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_prints_help_and_exits_0(capsys, command, flag):
  rc, out, err = run_cli(capsys, command, flag)
  assert rc == 0, err
  assert "usage:" in out and "--" in out, out


def test_config_commands_help_explains_overrides(capsys):
  for command in ("train", "compile"):
    rc, out, _ = run_cli(capsys, command, "--help")
    assert rc == 0 and "--config.SECTION.KEY=VALUE" in out and "--config.train.num_steps" in out, out
  assert "--topology" in run_cli(capsys, "compile", "--help")[1]


def test_top_level_help_and_unknown_command(capsys):
  rc, out, _ = run_cli(capsys, "--help")
  assert rc == 0 and all(name in out for name in cli.COMMANDS)
  rc, _, err = run_cli(capsys, "trian")
  assert rc == 2 and err.startswith("error: unknown command 'trian'")


@pytest.mark.parametrize("args,needles", [
    (["--config.train.num_stepz=3"], ["--config.train.num_stepz", "did you mean 'num_steps'"]),
    (["--config.modle.num_layers=3"], ["'modle'", "did you mean 'model'"]),
    (["--config.nope=1"], ["unknown key in the config: 'nope'"]),
    (["--config.train.num_steps=-5"], ["train.num_steps", "-5"]),
    (["--config.train.num_steps=abc"], ["--config.train.num_steps='abc'", "integer"]),
    (["--config.optimizer.learning_rate=nan"], ["optimizer.learning_rate=nan", "finite"]),
    (["--config.optimizer.learning_rate=inf"], ["optimizer.learning_rate=inf", "finite"]),
    (["--config.train=3"], ["--config.train is a section"]),
    (["--config=configs/no_such_file.py"], ["configs/no_such_file.py"]),
    (["--bogus"], ["unknown flag '--bogus'"]),
    (["--progress=maybe"], ["--progress", "maybe"]),
])
def test_train_config_mistakes_are_one_clear_error(capsys, args, needles):
  rc, _, err = run_cli(capsys, "train", *args)
  assert_usage_error(rc, err, *needles)


def test_overrides_are_applied_with_the_types_of_the_config():
  config, values = cli_flags.parse(
      ["ardiff train", "--config", os.path.join(ROOT, "configs", "ar_shakespeare.py"), "--config.train.num_steps=7",
       "--config.optimizer.learning_rate", "1e-4", "--config.model.tie_embeddings=true", "--config.optimizer.b1=1",
       "--noprogress"], description="", default_config="",
      flags=(cli_flags.Flag("progress", True, "", cli_flags.parse_bool),))
  assert config.objective.kind == "ar" and values == {"progress": False}
  assert config.train.num_steps == 7 and config.optimizer.learning_rate == 1e-4
  assert config.model.tie_embeddings is True and isinstance(config.optimizer.b1, float)


def test_debug_flag_and_env_var_show_the_traceback(capsys, monkeypatch):
  with pytest.raises(ValueError, match="did you mean 'num_steps'"):
    cli.main(["ardiff", "train", "--config.train.num_stepz=3", "--debug"])
  monkeypatch.setenv("ARDIFF_DEBUG", "1")
  with pytest.raises(ValueError, match="train.num_steps=-5"):
    cli.main(["ardiff", "train", "--config.train.num_steps=-5"])


def test_bugs_keep_their_traceback(monkeypatch):
  """Only expected (user-fixable) errors are folded into `error:`; anything else is a bug and propagates."""
  monkeypatch.setattr(cli_flags, "parse", lambda *a, **k: (_ for _ in ()).throw(TypeError("a bug")))
  with pytest.raises(TypeError, match="a bug"):
    cli.main(["ardiff", "train"])


def test_missing_run_directory_is_one_clear_error(capsys, tmp_path):
  missing = str(tmp_path / "no_run")
  for command in ("eval", "sample"):
    rc, _, err = run_cli(capsys, command, "--checkpoint", missing)
    assert_usage_error(rc, err, "no_run")


def test_corrupt_run_config_is_one_clear_error(capsys, tmp_path):
  (tmp_path / "config.json").write_text("{ half a file")
  rc, _, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path))
  assert_usage_error(rc, err, "config.json")


def test_eval_batches_must_be_positive(capsys, tmp_path):
  rc, _, err = run_cli(capsys, "eval", "--checkpoint", str(tmp_path), "--batches", "0")
  assert rc == 2 and "--batches=0 must be >= 1" in err


def test_refused_overwrite_is_one_clear_error(capsys, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  rc, _, err = run_cli(capsys, "export", "--run_dir", str(tmp_path / "run"), "--to", "hf", "--out", str(out))
  assert_usage_error(rc, err, str(out), "--overwrite")
  assert (out / "keep.txt").read_text() == "mine"


def test_argparse_mistakes_exit_2(capsys):
  rc, _, err = run_cli(capsys, "sample")
  assert rc == 2 and "--checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize("topology,needle", [
    ("v5p:8x8x88", "is not a v5p slice"),
    ("v5P:8x8x8", "did you mean 'v5p:8x8x8'"),
    ("v99:1x1", "unknown TPU generation 'v99'"),
    ("v5e:2x2x2", "v5e slices have 2 dimensions"),
    ("v5p:8x8", "v5p slices have 3 dimensions"),
    ("v5e:0x2", "is not a v5e slice"),
    ("v5e 2x2", "malformed TPU topology"),
    ("", "malformed TPU topology"),
])
def test_bad_topologies_are_rejected_before_any_work(capsys, topology, needle):
  start = time.perf_counter()
  rc, _, err = run_cli(capsys, "compile", f"--topology={topology}")
  assert time.perf_counter() - start < 2.0  # a malformed name used to compile for 30 s, or end in a TypeError
  assert_usage_error(rc, err, needle)


def test_parse_topology_accepts_the_real_slice_shapes():
  assert aot.parse_topology("v5e:2x2") == ("v5e", (2, 2))
  assert aot.parse_topology("v5p:8x8x8") == ("v5p", (8, 8, 8))
  assert aot.parse_topology("v6e:16x16") == ("v6e", (16, 16))
  assert aot.parse_topology("v4:4x4x4") == ("v4", (4, 4, 4))
  assert aot.hbm_per_chip("v5p:2x2x1") == aot.HBM_BYTES["v5p"]


def test_install_hint_only_when_libtpu_is_missing(monkeypatch):
  # libtpu is installed (requirements-dev): a shape it cannot lay out must not say "install the TPU compiler"
  with pytest.raises(UsageError, match="the TPU compiler rejected it") as e:
    aot.tpu_devices("v5e:3x3")
  assert "pip install" not in str(e.value)
  monkeypatch.setattr(aot, "_libtpu_installed", lambda: False)
  with pytest.raises(UsageError, match=r"libtpu\) is not installed.*pip install"):
    aot.tpu_devices("v5e:2x2")


def _subprocess(*args, env=None):
  return subprocess.run([sys.executable, "-m", "ardiff", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=180, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def test_real_command_line_exit_codes_and_no_traceback():
  p = _subprocess("train", "--config.train.num_stepz=3")
  assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
  assert "did you mean 'num_steps'" in p.stderr
  p = _subprocess("compile", "--help")
  assert p.returncode == 0 and "--topology" in p.stdout, p.stderr


def _fake_run(run_dir, **model):
  """A run directory as `ardiff train` leaves it (config.json and a checkpoint step), without training: the
  start checks read only these."""
  from ardiff.checkpoints import run_dir as run_dir_lib
  config = cli_flags.load_config_file(os.path.join(ROOT, "configs", "ar_shakespeare.py"))
  config.model.update(model)
  run_dir.mkdir()
  run_dir_lib.write_config(str(run_dir), config)
  (run_dir / "checkpoints" / "2").mkdir(parents=True)
  (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')


def test_train_refuses_before_writing_anything(capsys, tmp_path):
  """A fresh run over a run's checkpoints, a resume with another model, a missing init_from and a run_dir that is a
  file: each one `error:` naming the setting and the fix, and the run directory untouched."""
  ar = os.path.join(ROOT, "configs", "ar_shakespeare.py")
  run = tmp_path / "run"
  _fake_run(run, num_layers=1)
  before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  cases = [(["--config.model.num_layers=1", "--config.train.resume=false"],
            ["train.run_dir=", "latest step 2", "train.resume=False", "new train.run_dir"]),
           (["--config.model.num_layers=2"], ["another model", "num_layers: checkpoint 1 vs config 2"])]
  for extra, needles in cases:
    rc, _, err = run_cli(capsys, "train", "--config", ar, f"--config.train.run_dir={run}", *extra)
    assert_usage_error(rc, err, *needles)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
  fresh = tmp_path / "fresh"
  rc, _, err = run_cli(capsys, "train", "--config", ar, f"--config.train.run_dir={fresh}",
                       f"--config.train.init_from={tmp_path / 'nowhere'}")
  assert_usage_error(rc, err, "train.init_from=", "nowhere", "does not exist")
  assert not fresh.exists()
  (tmp_path / "afile").write_text("x")
  rc, _, err = run_cli(capsys, "train", "--config", ar, f"--config.train.run_dir={tmp_path / 'afile'}")
  assert_usage_error(rc, err, "is a file")


@pytest.mark.parametrize("source,needles", [
    ("def get_config(:\n", ["line 1", "invalid syntax"]),
    ("def get_config():\n  return {}['x']\n", ["line 2", "KeyError", "--debug"]),
])
def test_config_file_that_does_not_run_is_one_clear_error(capsys, tmp_path, source, needles):
  path = tmp_path / "mine.py"
  path.write_text(source)
  rc, _, err = run_cli(capsys, "train", "--config", str(path))
  assert_usage_error(rc, err, str(path), *needles)


def test_start_checks_let_a_resume_with_a_damaged_config_json_through(tmp_path):
  """A run whose config.json is damaged still resumes (the trainer restores the checkpoint and rewrites the file):
  the start checks skip the model comparison rather than call it another model."""
  from ardiff import experiment
  from ardiff.checkpoints import run_dir as run_dir_lib
  from ardiff.training import main as train_main
  run = tmp_path / "run"
  _fake_run(run, num_layers=1)
  (run / "config.json").write_text("{ half a file")
  config = cli_flags.load_config_file(os.path.join(ROOT, "configs", "ar_shakespeare.py"))
  config.model.num_layers = 1
  config.train.run_dir = str(run)
  assert train_main.check_start(experiment.validate(config), run_dir_lib.as_path(str(run))) is None  # no error
  assert (run / "config.json").read_text() == "{ half a file"  # and nothing written: the trainer rewrites it
