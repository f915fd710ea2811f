"""The Colab notebooks (colab/*.ipynb) run top to bottom and are committed clean.

Each notebook runs in a fresh IPython kernel on CPU with SPARGE_COLAB_SMALL=1 (tiny sizes), through
nbclient; any cell that raises fails the test. The kernel is this interpreter: the test writes a
"python3" kernelspec pointing at sys.executable into a temporary JUPYTER_PATH, which Jupyter searches
before user and system kernel directories, so a clean `pip install -e .[test]` venv is all it needs.
"""

import importlib.util
import json
import os
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
# Image outputs each notebook must show: quickstart's mask heat maps and sparsity sweep; distill's live
# loss plot, sample GIF and frame strip.
IMAGES = {"quickstart.ipynb": 2, "distill.ipynb": 3}


def load_generator():
  spec = importlib.util.spec_from_file_location("make_notebooks", os.path.join(COLAB, "make_notebooks.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def kernel(tmp_path, monkeypatch):
  """A kernel environment: this Python, CPU, SMALL, the checkout importable, Jupyter state in tmp_path."""
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(
    json.dumps(
      {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (sparge-jax tests)",
        "language": "python",
      }
    )
  )
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.setenv("SPARGE_COLAB_SMALL", "1")
  monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel then picks the inline backend, which shows images
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # Compiling dominates at these sizes; the cheapest code generation halves the notebooks' run time.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  # The notebooks import the checkout under test even where it is not pip-installed.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable
  workdir = tmp_path / "cwd"
  workdir.mkdir()
  return workdir


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_notebook_runs_top_to_bottom(name, kernel):
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(kernel)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  text = "".join(o.get("text", "") for o in outputs)
  # The kernel imported the checkout under test (not some other install).
  assert f"from {os.path.join(ROOT, 'sparge_jax')}\n" in text, text[:2000]
  images = [o for o in outputs if {"image/png", "image/gif"} & set(o.get("data", {}))]
  assert len(images) == IMAGES[name], f"{name} showed {len(images)} images, expected {IMAGES[name]}"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_notebook_is_committed_clean_and_matches_its_generator(name):
  path = os.path.join(COLAB, name)
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not cleared"
  generator = load_generator()
  generated = generator.notebook(generator.NOTEBOOKS[name])
  assert nbformat.writes(generated) == nbformat.writes(nb), (
    f"{name} differs from colab/make_notebooks.py; edit the generator and run it"
  )
  setup = nb.cells[0]
  assert setup.cell_type == "code" and 'REPO_URL = "' in setup.source
  assert 'SMALL = os.environ.get("SPARGE_COLAB_SMALL") == "1"' in setup.source
