# Two entry points (see README): `make demo` runs the main job, `make test` runs the CPU test suite.
# Both create .venv on first use, so they work on a fresh clone with nothing installed.
PYTHON ?= python3.12
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: demo test lint
demo: $(VENV)/.installed
	$(PY) -m train.distill

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
