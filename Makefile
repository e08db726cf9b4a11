# chatops — the two set-up commands are `make run` and `make test`; each installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := conformance/node_modules/.installed
HOST ?= 127.0.0.1
PORT ?= 8080
CONSOLE_PORT ?= 8501

.PHONY: install run serve test lint typecheck bench chaos clean node

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

node: $(NODE_STAMP)

$(NODE_STAMP): conformance/package.json conformance/package-lock.json
	cd conformance && npm ci --no-audit --no-fund --loglevel=error
	@touch $(NODE_STAMP)

# Starts the service on the embedded SQLite default under ./.data/, and the console beside it.
run: install
	@mkdir -p .data
	DATABASE_URL=$${DATABASE_URL:-sqlite:///$(CURDIR)/.data/chatops.db} BIN=$(BIN) HOST=$(HOST) PORT=$(PORT) CONSOLE_PORT=$(CONSOLE_PORT) bash scripts/run.sh

test: install node
	bash scripts/ensure-services.sh
	bash scripts/ensure-chromium.sh
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

bench: install node
	bash scripts/ensure-services.sh
	$(BIN)/python -m benchmarks

# Fault injection against a real service (docs/RELIABILITY.md); restarts the local Postgres.
chaos: install
	bash scripts/ensure-services.sh
	$(BIN)/python -m chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) conformance/node_modules .data .pytest_cache .mypy_cache .ruff_cache
