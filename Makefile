# The two commands a newcomer needs:
#   make demo   install, then segment a bundled image with the embedded default model
#   make test   install (+ headless Chromium for the browser test), then lint, check the import
#               contracts and run all tests
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: install browser demo test test-cuda lint mutation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"

# The demo's browser test drives Debian's Chromium through Playwright (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

demo: install
	$(BIN)/keyseg segment src/keyseg/assets/examples/example.png \
	  "Which shape is the colour of a carrot?" --out outputs/demo

test: install browser
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# On a machine with a CUDA device: only the tests marked `cuda` (they skip elsewhere).
test-cuda: install
	$(BIN)/python -m pytest -m cuda -rs

# Mutation testing of the core modules (docs/BENCHMARKS.md): a measurement, not a CI gate.
# One mutmut run per module against that module's own tests, in mutants-work/<group>/
# (works from a clean clone); one worker, niced. GROUPS=... narrows it, e.g.
#   make mutation GROUPS="losses fusion"
GROUPS ?=
mutation: install
	$(BIN)/python benchmarks/mutation.py $(GROUPS)

lint: install
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache outputs mutants mutants-work
