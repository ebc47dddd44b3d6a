# Developer entry points. A newcomer needs two: `make demo` and `make test`.
# Both create .venv on first use, so nothing has to be installed by hand.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Touched after a successful install: the install is redone only when
# pyproject.toml is newer than this file.
STAMP := $(VENV)/.installed

PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=
# e.g. SOAK_ARGS="--broker redis --duration 60"; by default both brokers, 120 s each.
SOAK_ARGS ?=
# The tests, the demo and the soak have their own, laxer mypy settings
# (pyproject.toml); all are checked. The other benchmarks are not, yet.
MYPY_TARGETS ?= celery_batches tests demo.py $(wildcard benchmarks/soak*.py)

.PHONY: venv test demo lint docs bench soak fresh-install clean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[test,lint,docs,bench,demo]'
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(PY) demo.py $(DEMO_ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy $(MYPY_TARGETS)
	$(VENV)/bin/lint-imports

docs: venv
	$(VENV)/bin/sphinx-build -W -b html docs docs/_build/html

bench: venv
	$(PY) benchmarks/run.py $(BENCH_ARGS)

soak: venv
	$(PY) benchmarks/soak.py $(SOAK_ARGS)

# Clean virtual environments of its own, not .venv: installs the checkout as
# docs/getting-started.rst says and runs its example with real workers.
fresh-install:
	bash .ci/fresh-install

clean:
	rm -rf $(VENV) build dist *.egg-info docs/_build .demo \
		.mypy_cache .ruff_cache .pytest_cache .tox
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
