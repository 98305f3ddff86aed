# The README's commands. Everything installs itself into .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-fast gen check-gen lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[gen,test,dev]"
	touch $(STAMP)

install: $(STAMP)

## Start the engine server on its embedded default: SQLite at data/engine.db, listening on 127.0.0.1:50051.
run: install
	$(PY) -m engine_server $(ARGS)

## The whole test suite (PostgreSQL tests skip with a reason when that server is absent).
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

## Regenerate engine_api/ from protos/ with the pinned generators.
gen: install
	$(PY) scripts/gen_protos.py

## Fails when the committed generated code differs from what protos/ generate.
check-gen: gen
	@git add -N engine_api && git diff --exit-code --stat -- engine_api \
		|| (echo "engine_api/ is stale: run 'make gen' and commit the result" && exit 1)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy engine_server worker_sdk storage

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

## Benchmarks: prints JSON and a table. BENCH_ARGS="--db postgresql://..." to run on PostgreSQL.
bench: install
	@$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
