# personalize — `make help` lists the targets.
# Every target installs what it needs into .venv first, so a fresh clone needs only python3 and make.

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel by default (a plain `torch` would pull GBs of CUDA packages on a CPU box).
# On a GPU machine: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed ## create .venv and install torch + the package (editable) + test tools

run: install ## the main job: two-stage personalization of the sample dog on the tiny model, offline
	$(VENV)/bin/personalize experiment=demo

test: install ## the fast CPU test suite (tiny model, real sample photos)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install ## the longer end-to-end tests too
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .cache
