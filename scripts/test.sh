#!/usr/bin/env bash
# The test command: set up, lint, type-check, build the docs site strictly, then the benchmarks
# in quick mode (a smoke test: it asserts no time), then the whole suite against the real services.
# Extra arguments go to pytest. pytest exits 5 when no test ran, which fails this script too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/bootstrap.sh
scripts/services.sh rabbitmq postgres redis mosquitto chromium

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The documentation site, strictly: a broken link, anchor or include fails the run.
# (Its Python examples run in the suite, tests/test_readme.py.)
site=$(mktemp -d)
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$site"
rm -rf "$site"
# hadolint and docker-compose config on the Docker files (their own venv, .venv-tools/).
scripts/check-deploy.sh
# Every benchmark once with tiny sizes, so none rots; fails only when one crashes.
.venv/bin/python -m bench --quick
# Last, so the run closes on pytest's summary line.
.venv/bin/python -m pytest "$@"
