# printrelay — the two commands of the README, and the checks behind them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test setup system-deps lint typecheck bench storm loadtest clean

$(BIN)/printrelay: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/printrelay

system-deps:
	./scripts/install-system-deps.sh

## relay + connector + a printer, and a test print through the tunnel
demo: setup system-deps
	$(BIN)/printrelay demo

## the whole test suite, with lint and type checks
test: setup system-deps lint typecheck
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

## load test: relay + connector swarm + Locust headless; report and plots in loadtest-results/
LOADTEST_ARGS ?= --users 50 --spawn-rate 10 --duration 60s --connectors 20 --printers-per-connector 5
loadtest: setup
	$(BIN)/python loadtest/run.py $(LOADTEST_ARGS) --out loadtest-results

## benchmarks, each next to its baseline (direct TCP, websockify, CUPS, the SQLite relay); JSON in bench-results/
BENCH_IDLE_CONNECTORS ?= 10000
bench: setup system-deps
	$(BIN)/python loadtest/bench_tunnel.py --out bench-results
	$(BIN)/python loadtest/bench_websocket.py --out bench-results
	$(BIN)/python loadtest/bench_small_jobs.py --out bench-results
	$(BIN)/python loadtest/bench_idle.py --connectors $(BENCH_IDLE_CONNECTORS) --out bench-results
	$(BIN)/python loadtest/bench_replicas.py --out bench-results

## abuse storms against a relay, and its memory after each; JSON in bench-results/
storm: setup
	$(BIN)/python loadtest/abuse_storm.py --storms 4 --seconds 60 --clients 40 --settle 40 --out bench-results

clean:
	rm -rf $(VENV) printrelay-data printrelay-demo .pytest_cache .mypy_cache .ruff_cache
