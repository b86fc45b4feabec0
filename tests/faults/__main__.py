"""The full reliability run: ``python -m tests.faults`` (``make reliability``).

Runs every kind of trial against the real broker and state indexes, prints one line per
trial and the totals, and exits non-zero if anything was lost, stale, left unpublished or
reported with a wrong status; in the seam trials (no fault injected) also if a command was
handed out twice, out of order or late, or published twice. Trials rotate over SQLite,
PostgreSQL and Redis state.

The scale-out trials: a private PostgreSQL restarted under the stores (pg_restart.py), a
private Redis killed or shut down under them and started again on its AOF (redis_restart.py),
one of three sidecars on one PostgreSQL killed (sidecars.py), and a node of a local three-node
cluster with quorum device queues killed or stopped (nodes.py; the cluster is started once,
about 20-35 s, for all of them, and removed at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import NamedTuple

from tests.faults.cluster import Cluster, local_cluster
from tests.faults.crash import consumer_kill_trial, producer_kill_trial
from tests.faults.ledger import Tally
from tests.faults.nodes import node_loss_trial
from tests.faults.pg_restart import pg_restart_trial
from tests.faults.redis_restart import redis_restart_trial
from tests.faults.seams import busy_gateways_trial, cancelled_enqueues_trial
from tests.faults.sidecars import sidecar_loss_trial
from tests.faults.states import STATE_KINDS, fresh_state
from tests.faults.storms import storm_trial

Trial = Callable[[random.Random, str, Path], Awaitable[Tally]]


class TrialKind(NamedTuple):
    name: str
    trials: int
    trial: Trial
    exactly_once: bool = False
    """No fault is injected: a command handed out twice is a failure too."""
    state: str | None = None
    """The one state kind the trial runs on (None: rotated over STATE_KINDS)."""

    def failures(self, tally: Tally) -> int:
        return tally.failures + (tally.duplicates if self.exactly_once else 0)


class LazyCluster:
    """The local cluster the node-loss trials share, started at the first one's need."""

    def __init__(self, stack: AsyncExitStack) -> None:
        self._stack = stack
        self._cluster: Cluster | None = None

    async def get(self) -> Cluster:
        if self._cluster is None:
            started = time.monotonic()
            self._cluster = await self._stack.enter_async_context(local_cluster())
            print(f"(a local cluster started in {time.monotonic() - started:.1f}s)")
        return self._cluster


def _plan(options: argparse.Namespace, cluster: LazyCluster) -> list[TrialKind]:
    def pg_restart(mode: str) -> Trial:
        return lambda rng, kind, directory: pg_restart_trial(
            mode, rng, seconds=options.storm_seconds
        )

    def redis_restart(mode: str) -> Trial:
        return lambda rng, kind, directory: redis_restart_trial(
            mode, rng, seconds=options.storm_seconds
        )

    async def sidecar(rng: random.Random, kind: str, directory: Path) -> Tally:
        return await sidecar_loss_trial(rng, kind, directory, seconds=options.storm_seconds + 2)

    def node_loss(fault: str) -> Trial:
        async def trial(rng: random.Random, kind: str, directory: Path) -> Tally:
            on = await cluster.get()
            async with fresh_state(kind, directory) as spec:
                tally, told = await node_loss_trial(
                    on, fault, rng, spec, seconds=options.storm_seconds + 2
                )
            print(f"  ({told})")
            return tally

        return trial

    def storm(fault: str) -> Trial:
        return lambda rng, kind, directory: storm_trial(
            fault, rng, kind, directory, seconds=options.storm_seconds
        )

    def drain(rng: random.Random, kind: str, directory: Path) -> Awaitable[Tally]:
        return consumer_kill_trial(rng, kind, directory, mode="drain")

    def busy(rng: random.Random, kind: str, directory: Path) -> Awaitable[Tally]:
        return busy_gateways_trial(rng, kind, directory, seconds=options.seam_seconds)

    def cancelled(rng: random.Random, kind: str, directory: Path) -> Awaitable[Tally]:
        return cancelled_enqueues_trial(rng, kind, directory, seconds=options.seam_seconds)

    return [
        TrialKind("producer killed", options.producer_kills, producer_kill_trial),
        TrialKind("consumer killed", options.consumer_kills, consumer_kill_trial),
        TrialKind("drain killed", options.drain_kills, drain),
        TrialKind("proxy cut", options.storms, storm("proxy-cut")),
        TrialKind("server close", options.storms, storm("server-close")),
        TrialKind("broker restart", options.broker_restarts, storm("broker-restart")),
        TrialKind("busy gateways", options.busy_gateways, busy, exactly_once=True),
        TrialKind("cancelled enqueues", options.cancelled_enqueues, cancelled, exactly_once=True),
        TrialKind("pg stop -m fast", options.pg_restarts, pg_restart("fast"), state="private pg"),
        TrialKind(
            "pg stop -m immediate", options.pg_restarts, pg_restart("immediate"), state="private pg"
        ),
        TrialKind(
            "redis kill -9", options.redis_restarts, redis_restart("kill"), state="private redis"
        ),
        TrialKind(
            "redis SIGTERM", options.redis_restarts, redis_restart("term"), state="private redis"
        ),
        TrialKind("sidecar killed", options.sidecar_kills, sidecar, state="postgres"),
        TrialKind("leader node killed", options.node_losses, node_loss("leader-kill")),
        TrialKind("follower stop_app", options.node_losses, node_loss("follower-stop")),
        TrialKind("leader partitioned", options.node_losses, node_loss("leader-partition")),
    ]


async def run(options: argparse.Namespace) -> tuple[Tally, int]:
    """Runs the plan; returns the grand total and how many failures it holds."""
    rng = random.Random(options.seed)
    totals: list[tuple[TrialKind, Tally]] = []
    async with AsyncExitStack() as stack:  # the cluster, if a trial started one, goes last
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="amqp-queue-faults-"))
        for planned in _plan(options, LazyCluster(stack)):
            tally = Tally()
            for number in range(planned.trials):
                kind = planned.state or STATE_KINDS[number % len(STATE_KINDS)]
                started = time.monotonic()
                result = await planned.trial(random.Random(rng.random()), kind, Path(scratch))
                seconds = time.monotonic() - started
                brief = _brief(result, planned.exactly_once)
                print(f"{planned.name} #{number + 1} on {kind} ({seconds:.1f}s): {brief}")
                tally += result
            totals.append((planned, tally))
    grand = Tally()
    failures = 0
    print("\nTotals by kind of trial:")
    for planned, tally in totals:
        print(f"  {planned.name:>18}: {_brief(tally, planned.exactly_once)}")
        grand += tally
        failures += planned.failures(tally)
    print("\nAll trials:")
    print("\n".join(grand.lines()))
    return grand, failures


def _brief(tally: Tally, seam: bool) -> str:
    brief = (
        f"trials={tally.trials} accepted={tally.accepted} delivered={tally.delivered} "
        f"lost={tally.lost} duplicates={tally.duplicates} stale={tally.stale} "
        f"wrong_status={tally.wrong_status} raced={tally.raced} late_mark={tally.late_mark} "
        f"drain_unseen={tally.drain_unseen} outbox_left={tally.outbox_left}"
    )
    # What only the scale-out trials measure (0 everywhere else).
    brief += (
        f" dup_publishes={tally.dup_publishes} out_of_order={tally.out_of_order}"
        if not seam
        else ""
    )
    brief += f" unclear_errors={tally.unclear_errors} orphans={tally.orphans}"
    if seam:  # what only the seam trials measure
        for name in ("out_of_order", "late", "dup_publishes", "cut_short", "slow_calls"):
            brief += f" {name}={getattr(tally, name)}"
    return f"{brief} errors={tally.errors}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--producer-kills", type=int, default=20)
    parser.add_argument("--consumer-kills", type=int, default=20)
    parser.add_argument("--drain-kills", type=int, default=10)
    parser.add_argument("--storms", type=int, default=6, help="per kind of network fault")
    parser.add_argument("--storm-seconds", type=float, default=4.0)
    parser.add_argument(
        "--broker-restarts",
        type=int,
        default=1,
        help="storms with a broker restart (rabbitmqctl -n NODE stop_app/start_app), each on a "
        "private RabbitMQ node started for it (scripts/rabbit-node.sh, a few seconds): the "
        "machine's broker is never restarted",
    )
    parser.add_argument(
        "--busy-gateways",
        type=int,
        default=6,
        help="seam trials with producers, gateways (consume and drains), a relay loop and "
        "short-lived stores at once; rotated over the state backends",
    )
    parser.add_argument(
        "--cancelled-enqueues",
        type=int,
        default=6,
        help="seam trials with enqueue calls cancelled at random moments",
    )
    parser.add_argument(
        "--seam-seconds", type=float, default=4.0, help="seconds of enqueuing per seam trial"
    )
    parser.add_argument(
        "--pg-restarts",
        type=int,
        default=2,
        help="storms with a private PostgreSQL stopped and started again, per stop mode "
        "(fast, immediate); the machine's server is never restarted",
    )
    parser.add_argument(
        "--redis-restarts",
        type=int,
        default=2,
        help="storms with a private Redis (AOF, appendfsync always) taken down and started "
        "again, per way down (SIGKILL, SIGTERM); the machine's Redis is never restarted",
    )
    parser.add_argument(
        "--sidecar-kills",
        type=int,
        default=3,
        help="storms over three sidecar processes on one PostgreSQL, one cut off and killed",
    )
    parser.add_argument(
        "--node-losses",
        type=int,
        default=2,
        help="storms on a local three-node cluster with quorum queues, per kind of loss (the "
        "leading node killed, a follower's app stopped, the leading node partitioned); 0 for "
        "all: no cluster is started",
    )
    parser.add_argument("--seed", type=int, default=random.randrange(2**32))
    options = parser.parse_args(argv)
    # The library logs reconnects and outbox retries as warnings; the figures are the output.
    logging.basicConfig(level=logging.CRITICAL)
    print(f"reliability run, seed {options.seed}")
    _, failures = asyncio.run(run(options))
    if failures:
        print(
            f"\nFAILED: {failures} failures (lost, stale, wrong status, outbox left; without "
            "faults also duplicates, out of order, late, published twice)"
        )
        return 1
    print(
        "\nOK: nothing lost, nothing stale, every status true, the outbox drained; without "
        "faults each command published and handed out once, in order, in time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
