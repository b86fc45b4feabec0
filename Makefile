# The README's commands are these targets; CI calls `make test` through .ci/run.
.PHONY: demo test lint services bench

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

bench:  ## the benchmarks against the real services; tables in bench/results/ (BENCH_ARGS=--quick)
	scripts/bootstrap.sh
	scripts/services.sh rabbitmq postgres redis mosquitto
	.venv/bin/python -m bench $(BENCH_ARGS)
