# Pilot: one-command setup, run and test.
#   make run    - train on one box (installs everything it needs first)
#   make test   - the test suite CI runs (installs everything it needs first)
# Both install uv if it is missing, sync the locked environment (building the
# Rust tokenizer extension), and then run.

SHELL := /bin/bash
.DEFAULT_GOAL := help

UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PY := .venv/bin/python
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0
export WANDB_SILENT := true
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

# make run knobs (override on the command line: make run DATA=path/to/text.txt)
DATA ?=
RUN_ARGS ?=

.PHONY: help setup run test test-all proto bench clean

help:
	@echo "make run     federated training on one box (DATA=path/to/text to use local text)"
	@echo "make test    run the test suite (what CI runs)"
	@echo "make proto   regenerate the protobuf code from proto/"
	@echo "make bench   run the benchmarks in bench/"

$(UV):
	@echo "uv not found: installing it with pip (user site)"
	python3 -m pip install --user --quiet uv || python3 -m pip install --quiet uv

.venv/.synced: pyproject.toml uv.lock $(UV) $(shell find rustbpe/src -name '*.rs' 2>/dev/null) $(wildcard rustbpe/Cargo.toml)
	$(UV) sync --frozen
	@touch $@

setup: .venv/.synced

run: setup
	$(PY) -m pilot.cli run --trainers 2 --data "$(or $(DATA),shakespeare)" --preset d4 --rounds 3 \
		--round-seconds 30 --run-config "batch-size=8 seq-len=128 eval-tokens=32768" $(RUN_ARGS)

test: setup
	$(PY) -m pytest -q --durations=15

test-all: setup
	$(PY) -m pytest -q -m ""

proto: setup
	$(PY) scripts/gen_proto.py

bench: setup
	$(PY) bench/train_throughput.py
	$(PY) bench/tokenizer.py

clean:
	rm -rf .venv .pytest_cache rustbpe/target
