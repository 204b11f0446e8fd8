# Two commands do all set-up: `make demo` (the main job) and `make test`. Both create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: demo test lint venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU build of torch first, so no dependency pulls a multi-GB CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,dp]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/fedpose compare configs/demo.toml --methods fedavg,fedprox,fedbn,feddyn,fedaw,fedgh --seeds 0

test: venv
	$(BIN)/pytest

lint: venv
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs
