# FH-AI developer entry points. `make demo` and `make test` are the README's two commands:
# each sets up everything it needs on a fresh Debian machine first.
PYTHON ?= python3
VENV := .venv
SEKMET_VENV := .venv-sekmet
BIN := $(VENV)/bin

.PHONY: setup services demo test lint bench clean

setup: $(VENV)/.installed $(SEKMET_VENV)/.installed services

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# SEKMET is a server, not a library of ours: it lives in its own environment.
$(SEKMET_VENV)/.installed:
	$(PYTHON) -m venv $(SEKMET_VENV)
	$(SEKMET_VENV)/bin/pip install --quiet sekmet-fhir==0.1.1
	touch $@

# Mosquitto comes from Debian; tests and the demo start their own broker on a free port.
# The store tests also use the machine's PostgreSQL (FHAI_TEST_POSTGRES overrides its URL): start it if it is down.
services:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; }
	@if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 && command -v pg_ctlcluster >/dev/null; then \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; fi

demo: setup
	$(BIN)/fhai-coordinator demo

test: setup
	$(BIN)/pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy edge_runtime coordinator fhir_adapters

bench: setup
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) $(SEKMET_VENV) .pytest_cache .mypy_cache .ruff_cache
