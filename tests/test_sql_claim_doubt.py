"""A claim whose COMMIT lost its answer: no command ends claimed that no claim handed out.

A drain's claim holds a device's commands for its hand-over and returns them (UPDATE ...
RETURNING). If its COMMIT lands while the client only sees its connection die, a claim that
raises :class:`StateError` as "nothing claimed" makes the drain requeue the messages, and the
next reader finds the commands claimed and drops them: delivered to nobody, lost.

Claims run on a private PostgreSQL while every connection to it is cut by a proxy, commits
slowed so that many are in flight at a cut (tests/pg_cuts.py); the commands are enqueued
beforehand on a connection of their own, never cut. Afterwards every command is either handed
out by a claim (one that returned, or one that raised saying its outcome is unknown, with
the records it may have claimed) or still open and unclaimed: never claimed without having
been handed out.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from amqp_queue.state import SqlStore, StateError
from amqp_queue.state.errors import ClaimOutcomeUnknown
from tests.faults.private_pg import private_postgres
from tests.pg_cuts import SLOW_COMMITS, cutting

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WORKERS = 8
SECONDS = 6.0
PER_ROUND = 3
"""Commands a worker enqueues for its device before each claim."""


@dataclass
class Claims:
    handed: set[str] = field(default_factory=set)
    """Ids a claim returned, or named as maybe claimed when it could not tell."""
    returned: int = 0
    refused: int = 0
    unknown: int = 0


async def _storm(
    writer: SqlStore, store: SqlStore, inject: Callable[[], Awaitable[None]]
) -> Claims:
    """``WORKERS`` loops, each enqueueing for a device of its own (on ``writer``) and claiming
    (on ``store``, half of them among the ids as a drain does) while ``inject`` runs."""
    claims = Claims()
    numbers = itertools.count()
    stop = time.monotonic() + SECONDS

    async def claiming(worker: int) -> None:
        device = f"dev-{worker}"
        while time.monotonic() < stop:
            ids = [
                await writer.enqueue(device, f"payload-{next(numbers)}".encode(), 3600)
                for _ in range(PER_ROUND)
            ]
            try:
                if worker % 3 == 0:
                    # A drain of the index alone: claim and hand-over in one transaction.
                    records = await store._drain_index(device)
                else:
                    records = await store.claim(device, ids if worker % 2 else None)
            except ClaimOutcomeUnknown as exc:
                claims.unknown += 1
                claims.handed.update(record.id for record in exc.records)
            except StateError:
                claims.refused += 1
                await asyncio.sleep(0.01)
            else:
                claims.returned += 1
                claims.handed.update(record.id for record in records)

    async def injecting() -> None:
        while time.monotonic() < stop:
            await inject()

    await asyncio.gather(injecting(), *(claiming(worker) for worker in range(WORKERS)))
    return claims


async def _states(url: str) -> dict[str, tuple[bool, str | None]]:
    """Every command in the index: id to (claimed or delivered, end reason)."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.text("SELECT id, delivered, claimed_until, end_reason FROM command_queue")
            )
            return {
                str(command_id): (bool(delivered) or claimed is not None, reason)
                for command_id, delivered, claimed, reason in rows
            }
    finally:
        await engine.dispose()


async def test_a_claim_that_raised_claimed_nothing_and_one_that_returned_holds_its_commands() -> (
    None
):
    async with private_postgres() as server:
        writer = await SqlStore.connect(server.url)
        try:
            async with cutting(server) as (url, inject):
                store = await SqlStore.connect(url, connect_args=SLOW_COMMITS)
                try:
                    claims = await _storm(writer, store, inject)
                finally:
                    await store.close()
        finally:
            await writer.close()
        states = await _states(server.url)

    assert claims.returned, "no claim went through"
    assert claims.refused, "no claim met a cut"
    claimed = {command_id for command_id, (taken, _) in states.items() if taken}
    not_open = {command_id for command_id, (taken, reason) in states.items() if taken or reason}
    lost = claimed - claims.handed
    assert not lost, (
        f"{len(lost)} commands claimed that no claim handed out ({claims.returned} claims "
        f"returned, {claims.refused} refused, {claims.unknown} unknown)"
    )
    assert claims.handed <= not_open, "a command a claim handed out is unclaimed again"
