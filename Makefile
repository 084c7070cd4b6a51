PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export DAGSTER_HOME := $(CURDIR)/dagster_home

.PHONY: demo test install lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/usp demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadscope --no-loadscope-reorder --max-worker-restart=0 --durations=25 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check usp_core usp_pipeline tests bench

bench: $(STAMP)
	$(BIN)/usp bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
