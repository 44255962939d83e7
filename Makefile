# Everything installs into .venv/ at the repository root; nothing but Python 3.11 is needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8787

.PHONY: install run test lint typecheck pytest bench soak demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	mkdir -p data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m service.server --host 127.0.0.1 --port $(PORT)

# Offline: a mock Cloudflare AI Gateway, the gateway, a key, the real SDKs and curl through it.
demo: install
	$(BIN)/python examples/demo.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-logo
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The suite under branch coverage, the gateway processes it starts included ([tool.coverage.*] in
# pyproject.toml); a failing test stops here, a total under fail_under fails the report.
pytest: install
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage combine -q
	$(BIN)/coverage report

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The benchmark needs wrk and nginx (Debian packages) besides the virtualenv.
bench: install
	@command -v wrk >/dev/null && command -v nginx >/dev/null || \
		{ (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx >/dev/null) || \
		  (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx >/dev/null); }
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# 200 concurrent streams for 60 s, then 10 minutes of mixed traffic watched for leaks (bench/README.md).
soak: install
	$(BIN)/python -m bench.soak $(SOAK_ARGS)
