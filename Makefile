# Two entry points (see README): `make demo` runs the main job, `make test` runs the CPU test suite.
# Both create .venv on first use, so they work on a fresh clone with nothing installed; constraints.txt pins
# the versions the GPU machines run.
PYTHON ?= python3.12
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[train,test]"
	touch $@

.PHONY: demo test lint
demo: $(VENV)/.installed
	$(PY) -m train.distill

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
