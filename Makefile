# Everything installs into .venv; a fresh machine needs only Python 3.11+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test test-latest lint docs docs-build bench bench-quick clean

# pytest-xdist workers for `make test` and `make test-latest` (0 runs in one process).
# Two on CI's 2 cores: one process keeps only about one core busy (tracing and most of
# XLA's compile are single-threaded). Whole files go to one worker (`loadfile`), so the
# module-scoped fixtures that share compiled solves are built once. The slowest tests are
# listed at the end, so a CI log shows where the suite's time goes.
PYTEST_WORKERS ?= 2
PYTEST_ARGS := -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15

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
	$(PY) -m pytest $(PYTEST_ARGS)
	$(VENV)/bin/mkdocs build --strict --quiet -f docs/mkdocs.yml -d ../site

# The second CI leg: the newest jax, numpy and scipy (no constraints.txt) on the oldest
# Python they support, 3.12 (`.ci/latest_python` finds it, pyenv's included), in its own
# .venv-latest. What `pip install lbfgs_implicit` gives a user today; upgraded on every
# run. Lint and docs are the pinned leg's job. Skipped, saying so, without Python 3.12+.
LATEST_VENV := .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python

test-latest:
	@py="$$(.ci/latest_python)"; \
	if [ -z "$$py" ]; then \
		echo "test-latest: SKIPPED: no Python >= 3.12 found (looked for python3.12, python3.13 and python3 on PATH and in pyenv's versions); the newest jax needs one."; \
		exit 0; \
	fi; \
	set -e; \
	if [ ! -x $(LATEST_PY) ]; then "$$py" -m venv $(LATEST_VENV); fi; \
	$(LATEST_PY) -m pip install --quiet --disable-pip-version-check --upgrade pip; \
	$(LATEST_PY) -m pip install --quiet --disable-pip-version-check --upgrade \
		--upgrade-strategy eager -e ".[dev,examples,bench]"; \
	$(LATEST_PY) -c "import sys, jax, numpy, scipy, equinox, lineax; print('test-latest: Python', sys.version.split()[0], 'jax', jax.__version__, 'numpy', numpy.__version__, 'scipy', scipy.__version__, 'equinox', equinox.__version__, 'lineax', lineax.__version__)"; \
	$(LATEST_PY) -m pytest $(PYTEST_ARGS) -p no:cacheprovider

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
	rm -rf $(VENV) $(LATEST_VENV) site .pytest_cache
