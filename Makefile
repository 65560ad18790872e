# Quickstep: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: demo test install install-dev lint pytest clean pipeline browser-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e '.[all]'
	touch $@

$(VENV)/.installed-serve: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e '.[serve,client,export]'
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

demo: install
	$(BIN)/quickstep-serve --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info
