# Quickstep: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: demo test install install-dev lint pytest clean pipeline docker-test device-prep device-smoke

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, from PyTorch's CPU index: on Linux a plain PyPI `torch==2.13.0` is the multi-GB CUDA build. Where
# that index cannot be reached pip falls back to its configured indexes (with a warning); TORCH_INDEX= skips it.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
$(VENV)/.installed-torch: constraints.txt | $(BIN)/python
	$(PIP) install -q --no-deps $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -c constraints.txt torch
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt $(VENV)/.installed-torch | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e '.[all]'
	touch $@

$(VENV)/.installed-serve: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e '.[serve,client]'
	touch $@

install: $(VENV)/.installed-serve
install-dev: $(VENV)/.installed-dev

# ruff over the whole tree; import-linter through a symlink tree that mirrors the package-dir mapping
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/python .ci/lint_imports.py

pytest: install-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint pytest

# Build and exercise the Docker images with a private Docker engine (root: it installs docker.io and runs dockerd)
docker-test: install-dev
	$(if $(filter 0,$(shell id -u)),,sudo )PY=$(abspath $(BIN)/python) docker/test-local.sh

demo: install
	@echo ""
	@echo "Quickstep demo: serving the bundled digits model on http://$(HOST):$(PORT)"
	@echo "  UI:    http://$(HOST):$(PORT)/ui"
	@echo "  docs:  http://$(HOST):$(PORT)/docs"
	@echo "  try:   curl -s -X POST http://$(HOST):$(PORT)/v1/generate -H 'content-type: application/json' -H 'accept: image/png' -d '{\"steps\": 1, \"seed\": 0, \"class_label\": 7, \"scale\": 8}' -o digit.png"
	@echo ""
	$(BIN)/quickstep-serve --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info

# Rebuild the bundled default model from scratch: teacher -> Direct CM student (constant lr) -> a cool-down from its
# EMA with the lr annealed linearly to 0 -> t_mid sweep -> export -> report.  Rerunning it continues an interrupted
# teacher, student or cool-down run (--resume) instead of refusing its --out.
RUNS ?= runs
TEACHER_STEPS ?= 4000
STUDENT_STEPS ?= 2000
COOLDOWN_STEPS ?= 600
BUNDLE_NAME ?= digits-direct-cm
BUNDLE ?= serve/bundled/$(BUNDLE_NAME)
fit_or_resume = if ls $(2)/step-*/config.json >/dev/null 2>&1; then $(BIN)/quickstep-train fit --resume $(2) --out $(2) --steps $(3); else $(BIN)/quickstep-train fit $(1) --out $(2) --steps $(3); fi
pipeline: install-dev
	$(call fit_or_resume,--preset digits-stf,$(RUNS)/teacher,$(TEACHER_STEPS))
	$(call fit_or_resume,--preset digits-direct-cm --teacher $(RUNS)/teacher,$(RUNS)/student,$(STUDENT_STEPS))
	$(call fit_or_resume,--preset digits-direct-cm --teacher $(RUNS)/teacher --set init_from=$(RUNS)/student --set optim.decay=linear,$(RUNS)/student-cooldown,$(COOLDOWN_STEPS))
	$(BIN)/quickstep-train eval --ckpt $(RUNS)/student-cooldown --n 1000 --steps 1,2 --sweep-t-mid --record-times --out $(RUNS)/student-eval
	$(BIN)/quickstep-export onnx --ckpt $(RUNS)/student-cooldown --out $(BUNDLE) --steps 1,2 --name $(BUNDLE_NAME)
	$(BIN)/quickstep-export report $(BUNDLE) --backend onnxruntime --backend torch --steps 1,2 --n 1000 --teacher $(RUNS)/teacher --out $(RUNS)/report
	$(BIN)/quickstep-export verify $(BUNDLE)

# The GPU device suite (issue 21; docs/performance.md "GPU"): device-prep downloads the CPython 3.12 wheelhouse .whl/
# that the suite installs on the device (no package index there) and checks the traveling size; device-smoke runs
# the same suite here on CPU with tiny sizes (~1 min; tests/test_device_suite.py runs it in the default suite).
device-prep: install-dev
	$(BIN)/python scripts/device_prep.py

device-smoke: install-dev
	bash scripts/device_suite.sh --smoke --out $(or $(OUT),runs/device-smoke)
