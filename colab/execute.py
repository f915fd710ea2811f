"""Runs notebooks of colab/ top to bottom in a fresh kernel and saves each with its outputs.

    python colab/execute.py colab/quickstart.py colab/distill.py   # writes colab/quickstart.ipynb, ...

Each argument is a notebook's jupytext pair (NAME.py, the source) or the .ipynb beside it. The cells come from
NAME.py; NAME.ipynb is rewritten (to a temporary name, then renamed) with the outputs, in sync with NAME.py.
The kernel is this Python with this environment (set SPARGE_COLAB_SMALL=1 for the CPU sizes) and this checkout
first on its PYTHONPATH, so the notebooks import the working tree; it runs in the notebook's folder, as Jupyter
runs a notebook. Streams are merged with carriage returns applied, so a progress
bar is saved as its last state. A cell that raises stops the run with the error, and nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys

import jupytext
import nbformat
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sparge_jax.files import atomic_write


def read_source(path: str) -> nbformat.NotebookNode:
  """The notebook of NAME.py (path: NAME.py or NAME.ipynb), with the metadata its header gives."""
  return jupytext.read(os.path.splitext(path)[0] + ".py")


def execute(notebook: nbformat.NotebookNode, cwd: str, *, timeout: int | None = None) -> nbformat.NotebookNode:
  """Runs every cell of notebook in place, in a new kernel of this Python started in cwd, with this checkout first
  on its PYTHONPATH."""
  # No kernel directories: "python3" is then ipykernel's own spec, which starts sys.executable, whatever other
  # kernels the user's or the system's Jupyter folders hold.
  kernel = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
  client = NotebookClient(
    notebook,
    km=kernel,
    timeout=timeout,
    coalesce_streams=True,
    record_timing=False,
    resources={"metadata": {"path": cwd}},
  )
  python_path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  client.execute(env={**os.environ, "PYTHONPATH": python_path})
  return notebook


def write_ipynb(notebook: nbformat.NotebookNode, path: str) -> None:
  with atomic_write(path) as f:
    f.write(jupytext.writes(notebook, fmt="ipynb"))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="colab/execute.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("notebooks", nargs="+", help="colab/NAME.py (or NAME.ipynb)")
  parser.add_argument("--timeout", type=int, default=None, help="seconds a cell may run (default: no limit)")
  args = parser.parse_args(argv)
  for path in args.notebooks:
    source = os.path.splitext(path)[0] + ".py"
    if not os.path.isfile(source):
      print(f"error: {source}: no such notebook source (a jupytext percent file)", file=sys.stderr)
      return 1
  for path in args.notebooks:
    stem = os.path.splitext(path)[0]
    print(f"running {stem}.py", flush=True)
    notebook = read_source(path)
    try:
      execute(notebook, os.path.dirname(os.path.abspath(stem)), timeout=args.timeout)
    except CellExecutionError as e:
      print(f"error: {stem}.py: a cell failed; nothing written\n{e}", file=sys.stderr)
      return 1
    write_ipynb(notebook, stem + ".ipynb")
    print(f"wrote {stem}.ipynb", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
