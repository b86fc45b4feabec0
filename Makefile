# The README's commands are these targets; CI calls `make test` through .ci/run.
.PHONY: demo test lint services bench bench-scale reliability reliability-scale cluster cluster-stop

demo:  ## run the main job
	scripts/demo.sh

test:  ## lint, type-check and run the whole suite against the real services
	scripts/test.sh

lint:
	scripts/bootstrap.sh
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	scripts/check-deploy.sh

services:
	scripts/services.sh

bench:  ## the benchmarks against the real services; tables in bench/results/ (BENCH_ARGS=--quick)
	scripts/bootstrap.sh
	scripts/services.sh rabbitmq postgres redis mosquitto
	.venv/bin/python -m bench $(BENCH_ARGS)

bench-scale:  ## fleet scale: 10,000 and 100,000 device queues, and 10,000 consume() streams in one process
	scripts/bootstrap.sh
	scripts/services.sh rabbitmq postgres redis
	.venv/bin/python -m bench --only scale --only streams --only fleet-scale $(BENCH_ARGS)

# Each broker-restart trial restarts a private RabbitMQ node started for it (scripts/rabbit-node.sh,
# a few seconds), never the machine's broker, so it is safe on a shared one. The scale-out trials
# likewise: a private PostgreSQL (scripts/pg-node.sh) for the database restarts, and a local
# three-node cluster of their own (scripts/cluster.sh, 20-35 s to start) for the node losses.
# PROPERTY_EXAMPLES sets the long property run (random seeds; CI runs a few, fixed).
PROPERTY_EXAMPLES ?= 300
# Every adversarial scenario on every state backend (the test command runs each on one):
# two processes, each taking whole files, fit two cores with the broker's and databases' work.
RELIABILITY_WORKERS ?= 2
reliability:  ## the full fault harness and long property runs; prints the totals (RELIABILITY_ARGS=...)
	scripts/bootstrap.sh
	scripts/services.sh rabbitmq postgres redis
	.venv/bin/python -m tests.faults $(RELIABILITY_ARGS)
	AMQP_QUEUE_FULL_MATRIX=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
		-n $(RELIABILITY_WORKERS) --dist loadfile \
		tests/test_adversarial_*.py tests/test_repeated_confirms.py tests/test_mark_commits.py \
		tests/test_review_mark_commits.py tests/test_review_rollout_twice.py \
		tests/test_review_relay_waits.py tests/test_close_under_publish.py \
		tests/test_sql_concurrent_start.py tests/test_cancelled_across_stores.py
	AMQP_QUEUE_PROPERTY_EXAMPLES=$(PROPERTY_EXAMPLES) .venv/bin/python -m pytest -q --timeout=0 \
		-p no:cacheprovider --hypothesis-show-statistics tests/properties

SCALE_ONLY = --producer-kills 0 --consumer-kills 0 --drain-kills 0 --storms 0 --broker-restarts 0 \
	--busy-gateways 0 --cancelled-enqueues 0
reliability-scale:  ## only the scale-out trials: PostgreSQL restarts, sidecar kills, cluster node losses
	scripts/bootstrap.sh
	scripts/services.sh rabbitmq postgres redis
	.venv/bin/python -m tests.faults $(SCALE_ONLY) $(RELIABILITY_ARGS)

# A local three-node RabbitMQ cluster of private nodes c1, c2, c3@localhost (AMQP ports 5681-5683,
# CLUSTER_BASE_PORT=... for others); the last line printed is the nodes' URLs, comma-separated,
# as AMQP_URL takes them. The machine's broker is not touched.
cluster:  ## start (or find) a local three-node RabbitMQ cluster; prints its URLs last
	scripts/cluster.sh start

cluster-stop:  ## stop the local cluster and delete its nodes' data
	scripts/cluster.sh stop
