# The two commands that do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP    := $(VENV)/.test-installed

.PHONY: install run test lint bench bench-ws load soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# `make run` needs only the runtime dependencies (and the demo's OpenID Connect
# provider): quick on a fresh clone.
$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[demo]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(RUNTIME_STAMP) $@

install: $(TEST_STAMP)

run: $(RUNTIME_STAMP)
	$(BIN)/bff-gateway demo

test: $(TEST_STAMP)
	$(BIN)/pytest -q

lint: $(TEST_STAMP)
	$(BIN)/ruff check gateway tests
	$(BIN)/ruff format --check gateway tests
	$(BIN)/mypy

bench: $(TEST_STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python tests/load/bench.py

# The WebSocket rows of `make bench` alone (no wrk needed).
bench-ws: $(TEST_STAMP)
	$(BIN)/python tests/load/bench.py --ws

load: $(TEST_STAMP)
	$(BIN)/pip install -q -e '.[load]'
	$(BIN)/python tests/load/run_load.py

# Mixed traffic against a real gateway, watching for leaks: `make soak SOAK_DURATION=120`
# (seconds; 600 by default). More settings in tests/load/soak.py (SOAK_USERS, SOAK_INTERVAL, ...).
SOAK_DURATION ?= 600
soak: $(TEST_STAMP)
	$(BIN)/python tests/load/soak.py --duration $(SOAK_DURATION)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache test-output
