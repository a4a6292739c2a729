# Two commands for a fresh clone: `make demo` (the main job on a built-in default) and `make test`.
# Both set up a local virtual environment first. torch is pinned to the CPU build 2.13.0: any other
# request pulls a CUDA build of several GB.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
HYPOTHESIS_PROFILE ?= ci

.PHONY: setup demo train-demo test lint bench docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[test]"
	touch $@

demo: setup
	$(PY) -m mantranet_cli demo

# Train release 4's detector on forgeries of the sample photographs for at most 30 minutes (docs/guides/training.md).
train-demo: setup
	$(PY) -m mantranet_cli demo --train

test: setup
	$(PY) -m ruff check .
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) benchmarks/bench_inference.py

# The documentation site into site/; --strict: a broken link, anchor or API reference fails the build.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[docs]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis site
