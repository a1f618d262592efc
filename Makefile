PYTHON ?= .venv/bin/python
PYTEST_WORKERS ?= 2

.PHONY: install format static-checks test test-slow test-soak all

install:
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e '.[dev,test]'

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

all: static-checks test
