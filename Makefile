# Two commands on a fresh machine:
#   make demo   # installs into .venv, runs examples/qwen3_moe.py (tiny random Qwen3-MoE, offline)
#   make test   # installs into .venv, runs the test suite (GPU tests skip without CUDA)
#
# TORCH pins the torch build installed first (a bare `torch` requirement resolved first would pull a
# multi-GB CUDA build). On a GPU machine with torch already installed: `make test VENV_FLAGS=--system-site-packages TORCH=`.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH),$(VENV)/bin/pip install -q $(TORCH))
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: setup demo test
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/python examples/qwen3_moe.py

test: setup
	$(VENV)/bin/python -m pytest -q
