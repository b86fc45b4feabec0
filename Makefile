# The README's commands are these targets; CI calls `make test` through .ci/run.
.PHONY: demo test lint services

demo:  ## run the main job
	scripts/demo.sh

test:  ## lint, type-check and run the whole suite against the real services
	scripts/test.sh

lint:
	scripts/bootstrap.sh
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

services:
	scripts/services.sh
