# The two commands a newcomer needs:
#   make demo   install, then segment a bundled image with the embedded default model
#   make test   install (+ headless Chromium for the browser test), then lint and run all tests
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
	  "Which shape is the colour of a lime?" --out outputs/demo

test: install browser
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/python -m pytest

# On a machine with a CUDA device: only the tests marked `cuda` (they skip elsewhere).
test-cuda: install
	$(BIN)/python -m pytest -m cuda -rs

# Mutation testing of the core modules (docs/BENCHMARKS.md): a measurement, not a CI gate.
# mutmut copies src/ and tests/ into mutants/ (works from a clean clone); one module at a
# time, one worker, niced. MUTATE=... narrows it to one pattern, e.g.
#   make mutation MUTATE='keyseg.model.losses.*'
MUTATION_SCOPE = \
  'keyseg.model.losses.*' \
  'keyseg.model.fusion.*' \
  'keyseg.metrics.*' \
  'keyseg.tokens.*' \
  'keyseg.processor.*' \
  'keyseg.model.keyseg.*special_embeddings__mutmut_*' \
  'keyseg.model.keyseg.*masks_from_hidden__mutmut_*' \
  'keyseg.model.keyseg.*decode_rows__mutmut_*' \
  'keyseg.model.keyseg.*projected_table__mutmut_*' \
  'keyseg.convert.lisa.x__compile__mutmut_*' \
  'keyseg.convert.lisa.x_rename__mutmut_*' \
  'keyseg.convert.lisa.x__ignored__mutmut_*' \
  'keyseg.convert.lisa.x_map_state__mutmut_*' \
  'keyseg.convert.keyseg_ref.x__normalise_names__mutmut_*' \
  'keyseg.convert.keyseg_ref.x_merge_lora_tensors__mutmut_*' \
  'keyseg.convert.sam.x_official_to_hf_key__mutmut_*' \
  'keyseg.convert.sam.x_convert_sam_state_dict__mutmut_*'
MUTATE ?= $(MUTATION_SCOPE)

mutation: install
	@for pattern in $(MUTATE); do \
	  echo "== mutmut run $$pattern"; \
	  OMP_NUM_THREADS=1 nice -n 10 $(BIN)/mutmut run --max-children 1 "$$pattern" \
	    > /dev/null || exit 1; \
	done
	$(BIN)/python benchmarks/mutation_score.py $(MUTATION_SCOPE)

lint: install
	$(BIN)/ruff check src tests benchmarks experiments

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache outputs mutants
