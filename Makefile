# Three commands on a fresh machine:
#   make demo   # installs torch + transformers + moe_compiler into .venv, runs examples/qwen3_moe.py (tiny, offline)
#   make test   # adds the test tools (triton, pytest, hypothesis, ruff), runs the test suite (GPU tests skip without CUDA)
#   make lint   # ruff, as CI runs it
#   make test-oldest   # the transformers-facing tests again on the oldest transformers we support (CI runs it too)
#
# TORCH pins the torch build installed first (a bare `torch` requirement resolved first would pull a
# multi-GB CUDA build). On a GPU machine with torch already installed: `make test VENV_FLAGS=--system-site-packages TORCH=`.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH ?= torch==2.13.0
# The oldest transformers release we support (the GPU machine runs it); its own huggingface-hub 1.x and httpx beside
# it, in a directory put first on PYTHONPATH, so .venv keeps the newest release.
OLDEST_TRANSFORMERS ?= 5.17.0
OLDEST := $(VENV)/transformers-$(OLDEST_TRANSFORMERS)

$(VENV)/.demo: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(TORCH),$(VENV)/bin/pip install -q $(TORCH))
	$(VENV)/bin/pip install -q -e ".[hf]"
	touch $@

$(VENV)/.installed: $(VENV)/.demo
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

$(OLDEST)/.installed: $(VENV)/.installed
	$(VENV)/bin/pip install -q --no-deps --target $(OLDEST) transformers==$(OLDEST_TRANSFORMERS) \
		"huggingface-hub>=1.5,<2" httpx httpcore h11 anyio sniffio certifi idna
	touch $@

.PHONY: setup demo test test-oldest lint
setup: $(VENV)/.installed

demo: $(VENV)/.demo
	$(VENV)/bin/python examples/qwen3_moe.py

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(VENV)/bin/python -m pytest -q -n auto --durations=30  # one worker per core (2 on the CI machine); the slowest 30 listed

# What changes between transformers releases: the MoE op sequences the passes match (the zoo), the FP8 / INT4
# checkpoint integrations, generate's auto-compile, the routers. ~3.5 min on the CI machine.
test-oldest: $(OLDEST)/.installed
	PYTHONPATH=$(OLDEST) $(VENV)/bin/python -m pytest -q -n auto tests/passes tests/integrations tests/test_generate.py \
		tests/ops/test_route.py
