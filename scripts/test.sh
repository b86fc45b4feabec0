#!/usr/bin/env bash
# The test command: set up, lint, type-check, then the whole suite against the real services,
# then the benchmarks in quick mode (a smoke test: it asserts no time).
# Extra arguments go to pytest. pytest exits 5 when no test ran, which fails this script too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/bootstrap.sh
scripts/services.sh rabbitmq postgres redis mosquitto

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# hadolint and docker-compose config on the Docker files (their own venv, .venv-tools/).
scripts/check-deploy.sh
# Every benchmark once with tiny sizes, so none rots; fails only when one crashes.
.venv/bin/python -m bench --quick
# Last, so the run closes on pytest's summary line.
.venv/bin/python -m pytest "$@"
