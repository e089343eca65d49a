"""Exported directories are readable like the rest of a run's outputs: files 0644 and directories 0755 under the
usual umask (safetensors' writer alone creates 0600 files, ``mkdtemp`` 0700 directories), and a stricter umask is
respected rather than overridden."""

import os
import stat

import jax
import pytest

from ardiff.config import ModelConfig
from ardiff.export import hf as hf_lib
from ardiff.checkpoints import params_dir as params_lib
from ardiff.model import init_params


@pytest.fixture(scope="module")
def tiny():
  cfg = ModelConfig(vocab_size=50, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                    mask_token_id=49)
  return cfg, init_params(cfg, jax.random.key(0))


@pytest.fixture
def umask():
  """Sets the process umask for one test and restores it afterwards."""
  old = os.umask(0o022)
  yield lambda mask: os.umask(mask)
  os.umask(old)


def _modes(root):
  """{relative path: permission bits} of ``root`` and everything below it."""
  out = {".": stat.S_IMODE(os.stat(root).st_mode)}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
  return out


def _expected(root, file_mode, dir_mode):
  return {rel: dir_mode if os.path.isdir(os.path.join(root, rel)) else file_mode for rel in _modes(root)}


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_params_dir_modes_follow_the_umask(tmp_path, tiny, umask, mask, file_mode, dir_mode):
  cfg, params = tiny
  umask(mask)
  out = params_lib.save_params_dir(params, cfg, tmp_path / "params")
  modes = _modes(out)
  assert params_lib.SAFETENSORS_FILE in modes
  assert modes == _expected(out, file_mode, dir_mode), {k: oct(v) for k, v in modes.items()}


def test_hf_export_and_overwrite_are_world_readable(tmp_path, tiny, umask):
  cfg, params = tiny
  umask(0o022)
  tok = tmp_path / "tokenizer.json"
  tok.write_text("{}")
  os.chmod(tok, 0o600)  # a private source file still lands readable in the export, like everything written there
  out = hf_lib.export_hf(params, cfg, tmp_path / "hf", tokenizer_files=[str(tok)])
  for overwrite in (False, True):  # the swap-in of a replacement keeps the modes too
    if overwrite:
      out = hf_lib.export_hf(params, cfg, out, tokenizer_files=[str(tok)], overwrite=True)
    modes = _modes(out)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(modes)
    assert modes == _expected(out, 0o644, 0o755), {k: oct(v) for k, v in modes.items()}


def test_output_that_cannot_be_created_is_one_clear_error(tmp_path, tiny, monkeypatch):
  """An --out under a file (or any path that cannot be made) names the path and the fix; nothing is left behind."""
  from ardiff.checkpoints import staging
  (tmp_path / "afile").write_text("x")
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(NotADirectoryError, match=r"cannot create the output directory .*afile/sub/out .*choose an --out"):
    with staging.staged_output(str(tmp_path / "afile" / "sub" / "out")):
      pass
  assert sorted(os.listdir(tmp_path)) == before
  # parents made before a later failure are removed again, deepest first
  def refuse(*a, **k):
    raise PermissionError(13, "Permission denied", str(tmp_path / "new1" / "new2"))
  monkeypatch.setattr(staging.tempfile, "mkdtemp", refuse)
  with pytest.raises(PermissionError, match="cannot create the output directory .*Permission denied"):
    with staging.staged_output(str(tmp_path / "new1" / "new2" / "out")):
      pass
  assert sorted(os.listdir(tmp_path)) == before
