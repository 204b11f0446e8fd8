# Two commands do all set-up: `make demo` (the main job) and `make test`. Both create .venv.
PYTHON ?= python3
# Where torch comes from when .venv has none: pip's configured index by default (PyPI gives the
# CUDA build on Linux x86_64, the CPU build on macOS and Windows); for example
# TORCH_INDEX=https://download.pytorch.org/whl/cpu picks the CPU build on Linux.
TORCH_INDEX ?=
# pytest-xdist processes for `make test` (auto: one per core; each test runs torch on one thread;
# a test file stays in one process, so a module's tests keep their order)
TEST_WORKERS ?= auto
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: demo test test-slow lint venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch before the project, so that the build chosen by TORCH_INDEX is the one that stays
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet \
		torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[dev,dp,simulation]'
	# the sources' bytecode now, as pip does for the installed packages: otherwise every test
	# worker and every fresh fedpose process compiles them on its first import
	$(BIN)/python -m compileall -q src
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/fedpose compare configs/demo.toml --methods fedaw,fedgh --seeds 0-2 --jobs 2 -c data.generate=true

# test: everything but the tests marked slow, which start real processes (Flower SuperLink and
# SuperNodes, a fresh interpreter running a documented example); test-slow: those (SLOW narrows
# them: CI runs SLOW="slow and not long", leaving out the tests marked long)
SLOW ?= slow
# PYTHONDONTWRITEBYTECODE is emptied for the tests: where a machine sets it, every worker would
# compile the sources and rewrite the test modules' asserts again on every run (seconds each);
# the caches go to __pycache__/, which git ignores
test: venv
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder

test-slow: venv
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -m "$(SLOW)"

lint: venv
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) runs
