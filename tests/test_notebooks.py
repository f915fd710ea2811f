"""The Colab notebooks: colab/NAME.py (jupytext percent format, the source) and colab/NAME.ipynb beside it.

The .ipynb files are committed with the outputs of a GPU run, so only their cells' sources are compared with the
.py files. Each notebook runs top to bottom on CPU with SPARGE_COLAB_SMALL=1 (tiny sizes) through
colab/execute.py, in a fresh kernel of this interpreter that imports this checkout; any cell that raises fails
the test.
"""

import ast
import importlib.util
import os
import tomllib

import jupytext
import nbformat
import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
# Images each notebook shows: the quickstart's block masks and sparsity sweep; distill's live loss curves, the
# samples' GIF and their frame strip.
IMAGES = {"quickstart": 2, "distill": 3}
NAMES = sorted(IMAGES)
# The cells both notebooks start with: title, setup (install), runtime heading, runtime check.
SETUP, RUNTIME = 1, 3


def load_execute():
  spec = importlib.util.spec_from_file_location("colab_execute", os.path.join(COLAB, "execute.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def source(name):
  return jupytext.read(os.path.join(COLAB, f"{name}.py"))


def pyproject():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def setup_functions(name):
  """The setup cell's imports, functions and REPO_URL, executed; none of its statements that install."""
  tree = ast.parse(source(name).cells[SETUP].source)
  kept = [
    node
    for node in tree.body
    if isinstance(node, ast.Import | ast.ImportFrom | ast.FunctionDef)
    or (isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["REPO_URL"])
  ]
  namespace = {}
  exec(compile(ast.Module(kept, type_ignores=[]), f"{name}.py setup cell", "exec"), namespace)
  return namespace


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_has_the_cells_of_its_py(name):
  paired = nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)
  nbformat.validate(paired)
  text = source(name)
  assert [(cell.cell_type, cell.source) for cell in paired.cells] == [
    (cell.cell_type, cell.source) for cell in text.cells
  ], f"colab/{name}.ipynb differs from colab/{name}.py: run jupytext --update --to ipynb colab/{name}.py"
  assert paired.metadata["jupytext"]["formats"] == "ipynb,py:percent"
  assert paired.metadata["accelerator"] == "GPU"  # Colab opens it on a GPU runtime


@pytest.mark.parametrize("name", NAMES)
def test_title_and_summary_come_before_any_code(name):
  cells = source(name).cells
  first = cells[0]
  assert first.cell_type == "markdown"
  title, _, summary = first.source.partition("\n\n")
  assert title.startswith("# ") and "\n" not in title
  assert len(summary.split()) >= 30, "a paragraph on what the notebook does"
  assert cells[SETUP].cell_type == "code" and cells[SETUP].source.startswith("# Setup:")


def test_setup_and_runtime_cells_are_the_same_in_both():
  quickstart, distill = source("quickstart").cells, source("distill").cells
  for index in (SETUP, RUNTIME - 1, RUNTIME):
    assert quickstart[index].source == distill[index].source, f"cell {index} differs"


@pytest.mark.parametrize("name", NAMES)
def test_repository_url_is_defined_once_and_is_the_projects(name):
  text = "\n".join(cell.source for cell in source(name).cells)
  url = setup_functions(name)["REPO_URL"]
  assert text.count(url) == 1 and text.count("REPO_URL = ") == 1
  assert url == pyproject()["project"]["urls"]["Source"]


@pytest.mark.parametrize(
  ("driver", "extras"),
  [
    ("580.159.03", "train,cuda13"),  # the H200 machines
    ("580.65.06", "train,cuda13"),
    (" 590.44.01\n", "train,cuda13"),
    ("575.57.08", "train,cuda12"),
    ("550.54.15", "train,cuda12"),  # Colab runtimes of the CUDA 12.4 line
    ("535.104.05", "train,cuda12"),
    ("525.60.13", "train,cuda12"),
    ("525.60.12", "train"),
    ("470.256.02", "train"),
    ("", "train"),
    ("[N/A]", "train"),
    (None, "train"),  # no nvidia-smi
  ],
)
def test_install_extras_follow_the_driver(driver, extras):
  for name in NAMES:
    assert setup_functions(name)["install_extras"](driver) == extras


def test_install_extras_are_the_projects():
  defined = pyproject()["project"]["optional-dependencies"]
  for driver in ("580.159.03", "550.54.15", None):
    assert set(setup_functions("quickstart")["install_extras"](driver).split(",")) <= set(defined)


def test_pip_arguments():
  namespace = setup_functions("quickstart")
  (line,) = namespace["pip_arguments"]("train,cuda12", None)
  requirement = Requirement(line)
  assert requirement.name == "sparge-jax"
  assert requirement.extras == {"train", "cuda12"}
  assert requirement.url == "git+" + namespace["REPO_URL"]
  assert namespace["pip_arguments"]("train", "/src/sparge-jax") == ["-e", "/src/sparge-jax[train]"]


def test_sparge_checkout(tmp_path):
  sparge_checkout = setup_functions("quickstart")["sparge_checkout"]
  assert sparge_checkout(os.path.join(COLAB, os.pardir)) == ROOT
  assert sparge_checkout(COLAB) is None  # no pyproject.toml
  (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n')
  assert sparge_checkout(str(tmp_path)) is None


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
  monkeypatch.setenv("SPARGE_COLAB_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel then picks the inline backend, which shows images
  # Compiling dominates at these sizes; the cheapest code generation halves the notebooks' run time.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  workdir = tmp_path / "cwd"
  workdir.mkdir()
  notebook = load_execute().execute(source(name), str(workdir), timeout=600)
  outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
  text = "".join(output.get("text", "") for output in outputs)
  # The kernel imported this checkout, not another install.
  assert f"from {os.path.join(ROOT, 'sparge_jax')}\n" in text, text[:2000]
  if name == "distill":
    assert f"trainer from {os.path.join(ROOT, 'train')}\n" in text, text[:2000]
  assert "implementation=auto -> xla" in text, text[:2000]
  images = [output for output in outputs if {"image/png", "image/gif"} & set(output.get("data", {}))]
  assert len(images) == IMAGES[name], f"{name} showed {len(images)} images, expected {IMAGES[name]}"
