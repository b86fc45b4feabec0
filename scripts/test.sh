#!/usr/bin/env bash
# The test command: set up, lint, type-check and build the docs site strictly while the
# benchmarks run in quick mode (a smoke test: it asserts no time), then the whole suite against
# the real services.
# Extra arguments go to pytest. pytest exits 5 when no test ran, which fails this script too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/bootstrap.sh
scripts/services.sh rabbitmq postgres redis mosquitto chromium

# Every benchmark once with tiny sizes, so none rots (it fails only when one crashes). Mostly
# waiting on the services, so it runs beside the CPU-bound checks below, and is waited for
# before the suite starts.
bench_log=$(mktemp)
.venv/bin/python -m bench --quick > "$bench_log" 2>&1 &
bench_pid=$!
# hadolint and docker-compose config on the Docker files (their own venv, .venv-tools/, which
# a fresh clone installs: 25 s of pip beside mypy's 17 s of CPU, on the other core).
deploy_log=$(mktemp)
scripts/check-deploy.sh > "$deploy_log" 2>&1 &
deploy_pid=$!
trap 'kill "$bench_pid" "$deploy_pid" 2>/dev/null || true; rm -f "$bench_log" "$deploy_log"' EXIT

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The documentation site, strictly: a broken link, anchor or include fails the run.
# (Its Python examples run in the suite, tests/test_readme.py.)
site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site"
rm -rf "$site"
if ! wait "$deploy_pid"; then
    cat "$deploy_log"
    echo "check-deploy failed" >&2
    exit 1
fi
cat "$deploy_log"
if ! wait "$bench_pid"; then
    cat "$bench_log"
    echo "bench --quick failed" >&2
    exit 1
fi
# Reaped: from here on their pids may be other processes'.
trap 'rm -f "$bench_log" "$deploy_log"' EXIT
tail -n 1 "$bench_log"
# Last, so the run closes on pytest's summary line. Six processes, each taking whole test
# files (a module's private broker or cluster stays in one process); the tests wait on the
# services most of the time (with six, the pytest processes used 1.1 of the two cores on
# average), so six fit two cores and keep the command under ten minutes (four: 12:05 from a
# fresh clone at 875573d; six: 9:19 at 04a777a; seven: 11:45 of pytest alone at 3bc806e, with
# one trial timing out under the load, against 9:20-9:38 with six).
# Files go out longest first (tests/file_order.py), not by their number of tests.
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-6}" --dist loadfile --no-loadscope-reorder "$@"
