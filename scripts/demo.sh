#!/usr/bin/env bash
# The main job: a fleet of simulated devices over the local RabbitMQ, on the embedded SQLite
# default, checked for lost and repeated commands. Extra arguments go to the demo
# (--devices N, --seconds S, --seed N, --json).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/bootstrap.sh
scripts/services.sh rabbitmq
.venv/bin/python -m amqp_queue.cli demo "$@"
