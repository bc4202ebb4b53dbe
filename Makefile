# Two commands set everything up on a fresh machine (Python 3.11 or 3.12): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/precise-jax demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# ruff (pyflakes, pycodestyle, bugbear), isort (import order, the tree's wrap style), mypy (ports, precise_jax);
# configured in pyproject.toml.
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/isort --check-only --diff ports precise_jax tests benchmarks
	$(BIN)/mypy
