#!/usr/bin/env bash
# The main job: a short, real run of the queue on the embedded SQLite default.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/bootstrap.sh
.venv/bin/python -m amqp_queue.demo "$@"
