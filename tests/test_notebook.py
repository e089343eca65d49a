"""docs/colab_quickstart.ipynb runs top to bottom as shipped: executed by nbclient in a fresh IPython kernel, on a
copy of the checkout in a temporary directory (so ``runs/colab`` lands there), with a short training run."""

import os
import re
import shutil
import sys

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join("docs", "colab_quickstart.ipynb")
# What the notebook needs from a checkout: the package, its configs and kernels, and the requirements it checks.
CHECKOUT = ("ardiff", "configs", "kernels_pallas", "requirements.txt", NOTEBOOK)
STEPS = 12  # a few optimizer steps: the test is about the cells running, not about the model learning


def _kernel_env(**extra):
  """The kernel is a fresh process: one CPU device (not the suite's 8 fake ones), the notebook's own matplotlib
  backend, nothing from this process's import path, and no location override."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "MPLBACKEND", "PYTHONPATH", "ARDIFF_REPO", "ARDIFF_QUICKSTART_STEPS")}
  env.update(JAX_PLATFORMS="cpu", **extra)
  return env


def _run(nb, cwd, env):
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": cwd}})
  return client.execute(env=env)


def _cell(nb, needle):
  [cell] = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
  return cell


def _text(cell):
  """Everything a cell printed or displayed as text."""
  parts = []
  for out in cell.outputs:
    parts.append(out.get("text", ""))
    parts.append(out.get("data", {}).get("text/plain", ""))
  return "".join(parts)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
  root = tmp_path_factory.mktemp("checkout")
  for rel in CHECKOUT:
    src, dst = os.path.join(ROOT, rel), os.path.join(root, rel)
    if os.path.isdir(src):
      shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.copy(src, dst)
  return str(root)


def test_quickstart_runs_top_to_bottom(checkout):
  nb = nbformat.read(os.path.join(checkout, NOTEBOOK), as_version=4)
  assert not re.search(r"YOUR_ORG|placeholder", "".join(c.source for c in nb.cells), re.I)
  # Opened from its place in the checkout (docs/), as Jupyter does: the first cell has to find the root itself.
  nb = _run(nb, os.path.join(checkout, "docs"), _kernel_env(ARDIFF_QUICKSTART_STEPS=str(STEPS)))

  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.execution_count is not None, cell.source
      assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
  assert os.path.isfile(os.path.join(checkout, "runs", "colab", "samples.txt"))
  assert "requirements.txt is already installed" in _text(_cell(nb, "find_checkout(ARDIFF_REPO)"))
  assert _text(_cell(nb, "samples.txt")).strip(), "the samples cell printed nothing"
  plot = _cell(nb, "plt.show()")
  # The inline backend is chosen once, before train(): an image here also means train() left the backend alone.
  assert any("image/png" in o.get("data", {}) for o in plot.outputs), f"no image from the plot cell: {plot.outputs}"
  numbers = r"\d+\.\d+"
  assert re.search(numbers, _text(_cell(nb, "-m ardiff eval"))), _text(_cell(nb, "-m ardiff eval"))
  assert re.search(numbers, _text(_cell(nb, "evaluate_run("))), _text(_cell(nb, "evaluate_run("))
  assert _text(_cell(nb, "sample_block_diffusion(")).count("tokens per forward") == 2


def test_quickstart_without_a_checkout_says_what_to_do(tmp_path, checkout):
  """Far from any checkout and with ARDIFF_REPO unset, the first cell stops and explains; a wrong ARDIFF_REPO too."""
  nb = nbformat.read(os.path.join(checkout, NOTEBOOK), as_version=4)
  nb.cells = [c for c in nb.cells if "find_checkout(ARDIFF_REPO)" in c.source]
  assert len(nb.cells) == 1
  for extra, needle in (({}, "Clone or upload the repository"), ({"ARDIFF_REPO": str(tmp_path)}, "not an ardiff")):
    with pytest.raises(nbclient.exceptions.CellExecutionError, match=needle):
      _run(nbformat.from_dict(nb), str(tmp_path), _kernel_env(**extra))
