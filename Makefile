# Quick start: `make train` (the main job) and `make test`. Each bootstraps .venv on a fresh
# machine with only Python 3.10+ installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test bench experiments clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job: tiny DeepSeek-V3 on an emulated 4-node x 8-GPU mesh (configs/orion_4x8.py).
# Rerunning resumes from the newest checkpoint in runs/orion_4x8.
train: $(STAMP)
	$(BIN)/dsv3-train --config=configs/orion_4x8.py

# The suite on $(TEST_WORKERS) pytest-xdist workers, each taking whole files, longest first
# (tests/conftest.py); TEST_WORKERS=0 runs it in one process. 3 workers on 2 cores: much of a
# worker's time is single-threaded compilation or waiting on a subprocess, so a third one fills
# the gaps (whole suite on this machine, one run each: 710 s with 3 workers, 797 s with 2).
TEST_WORKERS ?= 3
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Training-step throughput of the tiny config on one device (results/benchmark_step.*).
bench: $(STAMP)
	$(BIN)/python experiments/benchmark_step.py

# The cost-model tables (results/*.md, .csv, .png).
experiments: $(STAMP)
	$(BIN)/python experiments/run_analysis.py

clean:
	rm -rf runs .pytest_cache
