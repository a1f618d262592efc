PYTHON ?= .venv/bin/python
PYTEST_WORKERS ?= 2

.PHONY: install format static-checks test test-slow test-soak docs all

# The `torch` extra (PyTorch parity tests) only on Python 3.11, where torch installs as a CPU build:
# elsewhere pip would pull a CUDA build of several GB, and those tests skip.
install:
	test -x $(PYTHON) || python3 -m venv $(patsubst %/bin/python,%,$(PYTHON))
	$(PYTHON) -m pip install --upgrade pip
	if $(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then extras=dev,test,docs,torch; \
	else extras=dev,test,docs; fi; $(PYTHON) -m pip install -e ".[$$extras]"

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

static-checks:
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ty check

test:
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) -m "not slow and not soak"

test-slow:
	$(PYTHON) -m pytest -m slow

test-soak:
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) -m soak

# The documentation site (docs/ and the API page from the docstrings) into site/; any warning fails it.
docs:
	$(PYTHON) -m mkdocs build --strict --site-dir site

all: static-checks test docs
