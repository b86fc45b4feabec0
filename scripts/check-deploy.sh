#!/usr/bin/env bash
# Lints the deployment files without a Docker engine: hadolint on the Dockerfile and
# `docker-compose config` on docker-compose.yml, each failing on any finding, warnings and
# hadolint's info level included. The tools live in .venv-tools/, created once per change of
# scripts/tools-requirements.txt or scripts/tools-constraints.txt. Run by scripts/test.sh and
# `make lint`; safe to run on its own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TOOLS=.venv-tools
stamp=$TOOLS/.installed-$(cat scripts/tools-requirements.txt scripts/tools-constraints.txt |
  sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  # .venv's Python (>= 3.11; scripts/test.sh bootstraps it first), or the first python3.
  python=.venv/bin/python
  [ -x "$python" ] || python=python3
  echo "check-deploy: installing hadolint and docker-compose into $TOOLS"
  rm -rf "$TOOLS"
  "$python" -m venv "$TOOLS"
  PIP_CONSTRAINT=scripts/tools-constraints.txt \
    "$TOOLS/bin/python" -m pip install --quiet -r scripts/tools-requirements.txt
  touch "$stamp"
fi

"$TOOLS/bin/hadolint" Dockerfile
# docker-compose prints warnings (an unset variable, an unknown key) on stderr and still exits
# 0: any output fails the check. The sidecar's tokens are required by the file; any will do.
output=$(AMQP_QUEUE_TOKENS=check:token "$TOOLS/bin/docker-compose" -f docker-compose.yml config -q 2>&1) || {
  echo "$output" >&2
  echo "check-deploy: docker-compose config failed" >&2
  exit 1
}
if [ -n "$output" ]; then
  echo "$output" >&2
  echo "check-deploy: docker-compose config warned" >&2
  exit 1
fi
echo "check-deploy: Dockerfile and docker-compose.yml lint clean"
