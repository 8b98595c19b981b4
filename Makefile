# cm-tasks developer commands. `make demo` and `make test` work on a fresh clone: they create
# .venv (reused afterwards; re-installed when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# A Prefect database is for one Prefect version: each compat venv benchmarks in its own home.
BENCH_HOME := $(if $(filter .venv,$(VENV)),$(CURDIR)/.prefect-bench,$(abspath $(VENV))/prefect-bench)

# Test processes: most of the suite waits on servers and subprocesses. On 2 cores, two workers
# kept the CPU 56% busy (545 s), four 82% (431 s); six were slower again (497 s: each worker
# starts a Prefect test server of its own). PYTEST_WORKERS=0 runs it in one process.
export PYTEST_WORKERS ?= 4

# No telemetry from an offline machine; keeps logs clean too.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Prefect's temporary server (no PREFECT_API_URL: make demo, subprocess tests) must start within
# 20 s by default; a busy 2-core machine can take longer.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install demo test test-unit e2e compat wheel-test dist bench screenshots lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: obtain a STAC token from the bundled emulator and save it to a block (local Prefect)
demo: install
	env -u PREFECT_API_URL PREFECT_HOME=$(CURDIR)/.prefect $(PY) -m cm_tasks.demo

## lint: ruff (lint + format check), mypy --strict on src/, every import of src/ declared in
##   pyproject.toml (deptry), and the package's layers kept (import-linter: pyproject.toml)
lint: install
	$(VENV)/bin/ruff check src tests flows bench
	$(VENV)/bin/ruff format --check src tests flows bench
	$(VENV)/bin/mypy
	$(VENV)/bin/deptry src
	$(VENV)/bin/lint-imports --no-cache

# The tiers (docs/development.md): tests/unit (no Prefect API, no process, no network),
# tests/integration (one Prefect test harness per process, the emulator over HTTP) and
# tests/e2e (real servers, workers, processes, browser). The scale-out run and the wheel test
# are e2e tests selected by their markers (make e2e, make wheel-test), not run by make test.
TEST_ENV := env -u PREFECT_API_URL PREFECT_HOME=$(CURDIR)/.prefect-test
NOT_SLOW := -m "not scale_out and not wheel"

## test-unit: the unit tier alone (seconds; no Prefect server: PREFECT_API_URL is a closed port)
test-unit: install
	env PREFECT_API_URL=http://127.0.0.1:9/api PREFECT_HOME=$(CURDIR)/.prefect-test \
		$(PY) -m pytest -q tests/unit

## test: lint, type-check, then all three tiers (all but the scale-out run and the wheel test),
##   in $(PYTEST_WORKERS) worker processes (pytest-xdist, a module per worker at a time)
# The slowest modules first (e2e), so that the short ones fill the workers' time at the end.
test: lint
	$(TEST_ENV) $(PY) -m pytest -q $(NOT_SLOW) -n $(PYTEST_WORKERS) --dist loadfile \
		tests/e2e tests/integration tests/unit
	@test -x /usr/bin/chromium || echo "make test: the browser test (tests/e2e/test_run_form.py)" \
		"was skipped: no /usr/bin/chromium. Install it: apt-get update && apt-get install -y chromium"

## screenshots: the browser test, writing the README's pictures of the run form and artifact
screenshots: install
	$(TEST_ENV) CM_TEST_SCREENSHOTS_DIR=$(CURDIR)/docs/img CM_TEST_REQUIRE_BROWSER=1 \
		$(PY) -m pytest -q tests/e2e/test_run_form.py

## e2e: the scale-out run: PostgreSQL 15 + prefect server + two workers (needs postgresql-15)
e2e: install
	$(TEST_ENV) $(PY) -m pytest -q -m scale_out tests/e2e

## compat: the suite on every supported Prefect (client and server), one venv each under .compat/
##   (built once per constraints/prefect-X.Y.txt); one version: make compat PREFECT=3.2
compat:
	.ci/compat $(PREFECT)

## wheel-test: build the wheel, install it into a fresh venv, deploy/serve it from empty directories
wheel-test: install
	$(TEST_ENV) $(PY) -m pytest -q -m wheel tests/e2e

## dist: sdist and wheel into dist/, checked with twine
dist: install
	rm -rf dist
	$(PY) -m build --outdir dist .
	$(VENV)/bin/twine check --strict dist/*

## bench: side-by-side figures against the goals (a few minutes; see bench/RESULTS.md)
##   on another Prefect: make bench VENV=.compat/prefect-3.2 (after make compat PREFECT=3.2);
##   a part only: make bench BENCH_ARGS="--only bench_refresh.py bench_import.py"
bench: $(if $(filter .venv,$(VENV)),install)
	env -u PREFECT_API_URL PREFECT_HOME=$(BENCH_HOME) $(PY) bench/run.py $(BENCH_ARGS)

format: install
	$(VENV)/bin/ruff check --fix src tests flows bench
	$(VENV)/bin/ruff format src tests flows bench

clean:
	rm -rf .prefect .prefect-test .prefect-bench .mypy_cache .ruff_cache .pytest_cache build dist
	# .compat/ holds the per-Prefect venvs (slow to build): remove it by hand
