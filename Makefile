# personalize — `make help` lists the targets.
# Every target installs what it needs into .venv first, so a fresh clone needs only python3 and make.

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel by default (a plain `torch` would pull GBs of CUDA packages on a CPU box).
# On a GPU machine: make install-gpu (below).
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# e.g. BENCH_ARGS=--quick (smoke, seconds) | "--sd21 --device cuda" (SD 2.1-base shapes on a GPU)
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install install-gpu data run edit-demo sweep-smoke report-smoke test test-slow bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed ## create .venv and install torch + the package (editable) + test tools

# On a Linux CUDA machine PyPI's torch wheel is the CUDA build (TORCH_GPU="torch==2.13.0 --index-url <a cuXXX
# wheel index>" picks another CUDA); torchvision + torch-fidelity give Inception FID/IS, bitsandbytes 8-bit Adam.
TORCH_GPU ?= torch==2.13.0 torchvision
install-gpu: ## on a CUDA machine: .venv with the CUDA torch, Inception FID/IS and 8-bit Adam (README "On a GPU machine")
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_GPU)
	$(PY) -m pip install -q -e ".[dev,fidelity,bnb]"
	$(PY) -c "import torch; print('torch', torch.__version__, '| CUDA:', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
	touch $(VENV)/.installed

# The DreamBooth dataset (30 subjects, 158 photos, ~110 MB) into paths.dreambooth_dir (DREAMBOOTH_DIR, else
# ../shared/dreambooth); DATA_ARGS=verify_only=true checks a copy put there by hand, DATA_ARGS=force=true fetches again.
DATA_ARGS ?=
data: install ## fetch the DreamBooth dataset (30 subjects, 158 photos) and verify it; offline: says what to do
	$(VENV)/bin/personalize-data $(DATA_ARGS)

run: install ## the main job: two-stage personalization of the sample dog on the tiny model, offline
	$(VENV)/bin/personalize experiment=demo

# edit-demo reuses the newest finished demo run (one with samples/), else trains one first; DEMO_RUN=<run dir>
# picks another run. The photo and prompts are overridable: make edit-demo EDIT_PHOTO=my.jpg
OUTPUTS ?= $(or $(PERSONALIZE_OUTPUTS),outputs)
EDIT_PHOTO ?= data/samples/dog2/00.jpg
EDIT_SOURCE ?= a photo of a {class_noun}
EDIT_TARGET ?= a photo of {phrase}
LATEST_DEMO = ls -d $(OUTPUTS)/train/runs/*/samples 2>/dev/null | sed 's|/samples$$||' \
	| while read d; do grep -qx 'group: demo' "$$d/config.yaml" && echo "$$d"; done | tail -n 1

edit-demo: install ## put the demo's personalized dog into another photo (dog2's); prints the side-by-side
	@run="$(DEMO_RUN)"; [ -n "$$run" ] || run=$$($(LATEST_DEMO)); \
	if [ -z "$$run" ]; then echo "no finished demo run in $(OUTPUTS)/train/runs: training one first"; \
		$(VENV)/bin/personalize experiment=demo || exit 1; run=$$($(LATEST_DEMO)); fi; \
	echo "personalized run: $$run"; \
	$(VENV)/bin/personalize-edit run_dir="$$run" image="$(EDIT_PHOTO)" edit=fast \
		'source_prompt="$(EDIT_SOURCE)"' 'target_prompt="$(EDIT_TARGET)"'

# The smoke twin of Zeng et al.'s Table 1 (experiments/README.md): the real sweep and report code on the
# tiny model, 2 methods x 2 sample dogs, in about a minute on CPU; outputs under $(OUTPUTS)/.
sweep-smoke: install ## multirun: two_stage vs dreambooth on 2 sample dogs, tiny model, offline (~1 min)
	$(VENV)/bin/personalize -m experiment=zeng2023_table1_smoke

report-smoke: install ## the smoke sweep's table beside the paper's, per subject, CSV + plot in outputs/report/
	$(VENV)/bin/personalize-report experiment=zeng2023_table1_smoke

test: install ## the fast CPU test suite (tiny model, real sample photos)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install ## the longer end-to-end tests too
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

# Ratios measured in one run on a random-weight SD-shaped model (no hub); ~10 min on a 2-core CPU for the
# methods, 2-3 min more per option variant (benchmarks/variants.yaml; BENCH_ARGS="--variants none" skips them).
bench: install ## every method's step vs the floor and the naive path, generation, end to end, memory (docs/benchmark.md)
	$(PY) -m benchmarks $(BENCH_ARGS)

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .cache
