# Set-up is part of every target: a fresh clone needs nothing but `make test` or `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo lint clean

setup: $(STAMP)

# The CPU torch wheel goes in first: installed later, as a dependency, pip would pull CUDA builds.
$(STAMP): pyproject.toml benchmarks/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,track,text]" -e ./benchmarks
	touch $(STAMP)

# One worker per core (at most 4: each holds torch and a few tiny pipelines; most tests run on one
# thread), a test file per worker (its module fixtures, e.g. trained tiny models, built once).
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile tests

demo: $(STAMP)
	$(PY) -m avq_bench.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
