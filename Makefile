# The README's commands. Everything installs itself into .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NODE_WORKER := examples/node-worker
NODE_STAMP := $(NODE_WORKER)/node_modules/.installed-stamp

.PHONY: install run test test-fast gen check-gen lint format bench bench-profile bench-floors clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[gen,test,dev,bench]"
	touch $(STAMP)

install: $(STAMP)

## Start the engine server on its embedded default: SQLite at data/engine.db, listening on 127.0.0.1:50051.
run: install
	$(PY) -m engine_server $(ARGS)

## The Node.js worker's packages, for its end-to-end test (skipped with a note when npm is missing).
$(NODE_STAMP): $(NODE_WORKER)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		cd $(NODE_WORKER) && npm ci --no-audit --no-fund && touch node_modules/.installed-stamp; \
	else \
		echo "npm not found: the Node.js worker tests will skip (or fail with ENGINE_TEST_REQUIRE_SERVICES=1)"; \
	fi

## The whole test suite (PostgreSQL tests skip with a reason when that server is absent).
test: install $(NODE_STAMP)
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
	$(PY) -m mypy engine_server worker_sdk storage pipelinectl

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

## Benchmarks: prints JSON and a table. BENCH_ARGS="--db postgresql://..." to run on PostgreSQL.
bench: install
	@$(PY) -m bench $(BENCH_ARGS)

## The peers (Celery, bamboo-engine) live in their own venv, so the project's dependencies stay clean.
## Installed when missing or when bench/peers/requirements.txt changes; pip's output goes to stderr.
PEERS_VENV := .venv-peers
# bamboo-engine 3.0.7 supports Python < 3.12, whatever PYTHON the project itself uses.
PEERS_PYTHON ?= python3.11
PEERS_STAMP := $(PEERS_VENV)/.installed-stamp

$(PEERS_STAMP): bench/peers/requirements.txt
	@echo "installing the benchmark peers into $(PEERS_VENV)" >&2
	@$(PEERS_PYTHON) -m venv $(PEERS_VENV) >&2
	@$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip >&2
	@$(PEERS_VENV)/bin/python -m pip install --quiet -r bench/peers/requirements.txt >&2
	@touch $(PEERS_STAMP)

## The engine side by side with Celery and bamboo-engine: JSON on stdout, the table on stderr.
## BENCH_ARGS="--repeat 1 --db sqlite --scenario bamboo-17" narrows it (see bench/peers/README.md).
## (`install` runs through a sub-make with its output on stderr, so stdout carries only the JSON.)
.PHONY: bench-peers
bench-peers: $(PEERS_STAMP)
	@$(MAKE) --no-print-directory install >&2
	@$(PY) -m bench.compare $(BENCH_ARGS)

## The engine server sampled by py-spy during the sustained scenario: flame graph, speedscope file and
## a top-functions summary in bench/profiles/.
bench-profile: install
	@$(PY) -m bench --scenario sustained --repeat 1 --profile bench/profiles $(BENCH_ARGS)

## What one chain hop cannot go below on this machine: a durable commit and a gRPC round trip, measured alone.
## BENCH_ARGS="--db postgresql://postgres@127.0.0.1:5432/postgres" adds PostgreSQL's commit.
bench-floors: install
	@$(PY) -m bench.floors $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) data .pytest_cache .mypy_cache .ruff_cache
