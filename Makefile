# batchgen developer commands. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel of this exact version ships with the dev machines; an unpinned torch would pull CUDA builds.
TORCH  := torch==2.13.0

.DEFAULT_GOAL := help
# apt-get needs root; as another user it goes through sudo.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help install install-dev chromium run test test-fast test-browser fuzz soak lint bench bench-gpu clean

help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## Create .venv and install batchgen (torch pinned)

install-dev: $(VENV)/.installed-dev ## Install with the dev extras (pytest, ruff)

run: install ## Render the embedded styles sweep into runs/styles
	$(BIN)/batchgen +sweep=styles

# The browser tests need a Chromium: BATCHGEN_CHROMIUM, one on PATH, or the distribution's package.
chromium:
	@[ -n "$$BATCHGEN_CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || command -v google-chrome >/dev/null 2>&1 \
	  || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

test: install-dev chromium ## Run the test suite, index.html in headless Chromium included (apt-get installs chromium)
	$(BIN)/pytest

test-fast: install-dev ## Run the tests not marked slow, without the browser
	$(BIN)/pytest -m "not slow and not browser"

test-browser: install-dev chromium ## Only the index.html tests in headless Chromium (apt-get installs chromium)
	$(BIN)/pytest -m browser

fuzz: install-dev ## The property tests with 3000 cases each (make test runs 60)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest tests/test_fuzz.py

soak: install-dev ## SIGKILL renders (2 local workers; 2 Ray actors) at 20 seeded random points each, resume, check
	$(BIN)/python -m tests.soak 20

lint: install-dev ## ruff check and ruff format --check at 119 columns
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install-dev ## Run the benchmark (Ray included) and append figures to BENCHMARKS.md
	$(BIN)/python benchmarks/bench.py

bench-gpu: install-dev ## GPU bench (CUDA, ~8 min): SD1.5/SDXL/FLUX.1 bf16+fp8 vs diffusers, offload plans
	$(BIN)/python benchmarks/bench_gpu.py

clean: ## Remove runs/ and caches (not .venv)
	rm -rf runs .pytest_cache .ruff_cache
