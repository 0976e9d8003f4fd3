# Everything goes through .venv; it is (re)built when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-16)
CONFIG ?= configs/demo.toml
PYTEST_ARGS ?= --durations=30

.PHONY: venv run app test test-fast lint format docs bench clean

venv: $(STAMP)

# Keep pip's byte-compiling: with PYTHONDONTWRITEBYTECODE=1 (set on this machine) nothing else
# writes .pyc files, and every process would compile torch from source (--no-compile made the
# suite 1.5x slower).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

run: venv
	$(VENV)/bin/freshnet run --config $(CONFIG) --night 1
	$(VENV)/bin/freshnet run --config $(CONFIG) --night 2
	@echo
	@echo "Open the app: make app   (serves the Space repo's HEAD on http://127.0.0.1:7860)"

app: venv
	$(VENV)/bin/freshnet serve --config $(CONFIG)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy  # strict on freshnet/, see [tool.mypy] in pyproject.toml

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# README.md's config table, rendered from the config model (tests/test_docs.py checks it).
docs: venv
	$(PY) tools/config_table.py

bench: venv
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .freshnet .freshnet-cache .pytest_cache
