# Everything installs into .venv; a fresh machine needs only Python 3.11+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test lint docs docs-build bench bench-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip

# The bench extra (pure-Python peers) is part of the test set-up: the benchmark smoke
# test runs each peer's adapter so it does not rot.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) -e ".[dev,examples,docs,bench]"
	touch $@

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q
	$(VENV)/bin/mkdocs build --strict --quiet -f docs/mkdocs.yml -d ../site

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright lbfgs_implicit

docs: $(STAMP)
	$(VENV)/bin/mkdocs serve -f docs/mkdocs.yml

docs-build: $(STAMP)
	$(VENV)/bin/mkdocs build --strict -f docs/mkdocs.yml -d ../site

bench: $(STAMP)
	$(PY) -m benchmarks.run --full

bench-quick: $(STAMP)
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf $(VENV) site .pytest_cache
