# The two commands of the README: `make demo` runs the main job on the real data, `make test`
# runs the test suite. Both set up their own virtualenv on a fresh machine; Java 17 and
# InfluxDB are installed with apt on first use when running as root.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/arbstream demo

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q
