"""The full reliability run: ``python -m tests.faults`` (``make reliability``).

Runs every kind of trial against the real broker and state indexes, prints one line per
trial and the totals, and exits non-zero if anything was lost, stale, left unpublished or
reported with a wrong status. Trials rotate over SQLite, PostgreSQL and Redis state.
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
from pathlib import Path

from tests.faults.crash import consumer_kill_trial, producer_kill_trial
from tests.faults.ledger import Tally
from tests.faults.states import STATE_KINDS
from tests.faults.storms import storm_trial

Trial = Callable[[random.Random, str, Path], Awaitable[Tally]]


def _plan(options: argparse.Namespace) -> list[tuple[str, int, Trial]]:
    def storm(fault: str) -> Trial:
        return lambda rng, kind, directory: storm_trial(
            fault, rng, kind, directory, seconds=options.storm_seconds
        )

    def drain(rng: random.Random, kind: str, directory: Path) -> Awaitable[Tally]:
        return consumer_kill_trial(rng, kind, directory, mode="drain")

    return [
        ("producer killed", options.producer_kills, producer_kill_trial),
        ("consumer killed", options.consumer_kills, consumer_kill_trial),
        ("drain killed", options.drain_kills, drain),
        ("proxy cut", options.storms, storm("proxy-cut")),
        ("server close", options.storms, storm("server-close")),
        ("broker restart", options.broker_restarts, storm("broker-restart")),
    ]


async def run(options: argparse.Namespace) -> Tally:
    rng = random.Random(options.seed)
    totals: list[tuple[str, Tally]] = []
    with tempfile.TemporaryDirectory(prefix="amqp-queue-faults-") as scratch:
        for name, trials, trial in _plan(options):
            tally = Tally()
            for number in range(trials):
                kind = STATE_KINDS[number % len(STATE_KINDS)]
                started = time.monotonic()
                result = await trial(random.Random(rng.random()), kind, Path(scratch))
                seconds = time.monotonic() - started
                print(f"{name} #{number + 1} on {kind} ({seconds:.1f}s): {_brief(result)}")
                tally += result
            totals.append((name, tally))
    grand = Tally()
    print("\nTotals by kind of trial:")
    for name, tally in totals:
        print(f"  {name:>15}: {_brief(tally)}")
        grand += tally
    print("\nAll trials:")
    print("\n".join(grand.lines()))
    return grand


def _brief(tally: Tally) -> str:
    return (
        f"trials={tally.trials} accepted={tally.accepted} delivered={tally.delivered} "
        f"lost={tally.lost} duplicates={tally.duplicates} stale={tally.stale} "
        f"wrong_status={tally.wrong_status} raced={tally.raced} late_mark={tally.late_mark} "
        f"drain_unseen={tally.drain_unseen} outbox_left={tally.outbox_left} errors={tally.errors}"
    )


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
        help="storms with a broker restart (rabbitmqctl stop_app/start_app): every client of "
        "the broker loses its connection, so 0 on a shared broker",
    )
    parser.add_argument("--seed", type=int, default=random.randrange(2**32))
    options = parser.parse_args(argv)
    # The library logs reconnects and outbox retries as warnings; the figures are the output.
    logging.basicConfig(level=logging.CRITICAL)
    print(f"reliability run, seed {options.seed}")
    grand = asyncio.run(run(options))
    if grand.failures:
        print(f"\nFAILED: {grand.failures} failures (lost, stale, wrong status, outbox left)")
        return 1
    print("\nOK: nothing lost, nothing stale, every status true, the outbox drained")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
