# Three commands on a fresh machine:
#   make demo   # installs torch + transformers + moe_compiler into .venv, runs examples/qwen3_moe.py (tiny, offline)
#   make test   # adds the test tools (triton, pytest, hypothesis, ruff), runs the test suite (GPU tests skip without CUDA)
#   make lint   # ruff, as CI runs it
#
# TORCH pins the torch build installed first (a bare `torch` requirement resolved first would pull a
# multi-GB CUDA build). On a GPU machine with torch already installed: `make test VENV_FLAGS=--system-site-packages TORCH=`.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH ?= torch==2.13.0

$(VENV)/.demo: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH),$(VENV)/bin/pip install -q $(TORCH))
	$(VENV)/bin/pip install -q -e ".[hf]"
	touch $@

$(VENV)/.installed: $(VENV)/.demo
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: setup demo test lint
setup: $(VENV)/.installed

demo: $(VENV)/.demo
	$(VENV)/bin/python examples/qwen3_moe.py

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(VENV)/bin/python -m pytest -q -n auto --durations=30  # one worker per core (2 on the CI machine); the slowest 30 listed
