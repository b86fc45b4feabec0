#!/usr/bin/env bash
# The test command: set up, lint, type-check, then the whole suite against the real services.
# Extra arguments go to pytest. pytest exits 5 when no test ran, which fails this script too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/bootstrap.sh
scripts/services.sh rabbitmq postgres redis

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
