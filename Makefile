# Two commands do everything on a fresh machine:
#   make demo   -- the main job: a small end-to-end study on the default scenario, with a report
#   make test   -- lint and the whole test suite
#   make docs   -- the documentation site into site/ (mkdocs build --strict: warnings are errors)
# Each creates (or reuses) .venv with python3.12 and installs the package with its test and docs extras.

PYTHON ?= python3.12
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint docs bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,docs]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bayes-dgme demo --out demo-output

lint: $(STAMP)
	$(BIN)/ruff check bayes_dgme tests benchmarks analyses

test: lint
	$(BIN)/python -m pytest -n 2 --durations=15

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --clean --site-dir site

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean-venv:
	rm -rf $(VENV)
