# Two commands matter: `make demo` (the main job) and `make test` (the test suite).
# Both set up a virtual environment in .venv first. The dev install pins the CPU build of torch
# so that a fresh machine does not pull a multi-GB CUDA build; the package itself asks for
# torch>=2.4, so GPU users keep their own torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed-dev

.PHONY: install test test-all test-gpu demo bench bench-quick wheel clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	touch $(STAMP)

install: $(STAMP)

# The default suite: CPU only, Triton kernels through the interpreter, `slow` and `gpu` deselected.
test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

# Everything that can run on this machine, slow tests included.
test-all: install
	$(BIN)/python -m pytest -m "not gpu" -q

# On a CUDA machine: the whole suite, gpu tests included.
test-gpu: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/muscle-fast demo

bench: install
	$(BIN)/python -m benchmarks

bench-quick: install
	$(BIN)/python -m benchmarks --quick

wheel: $(BIN)/python
	$(BIN)/python -m pip wheel --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info muscle_fast/_native*.so
