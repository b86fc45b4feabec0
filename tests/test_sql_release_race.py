"""A give-back on PostgreSQL racing another process's latest-wins replacement.

A release ends the given-back commands whose slot a newer command took (rule 3), then opens
the rest again, in two statements. On PostgreSQL each statement sees the commits made before
it: a replacement committed between them (or still uncommitted at the first) is not seen by
the first, and the second, reopening the older command of that slot, meets the partial unique
index. The whole release rolled back, so every command of it, plain ones included, stayed
DELIVERED to nobody (found by an adversarial review, with the public API, on its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime

import pytest
import sqlalchemy as sa

from amqp_queue import CommandStatus
from amqp_queue.state import SqlStore
from amqp_queue.state.sql import statements as sql
from amqp_queue.state.sql import transactions
from tests.backends import POSTGRES_URL, postgres_schema
from tests.drain_claims import drained

pytestmark = pytest.mark.timeout(60)


_HOLD = 0x5EA1  # the advisory lock a paused release waits on between its statements


def _paused_release(
    reached: asyncio.Event,
) -> Callable[..., transactions.Transaction[int]]:
    """transactions.release that, between its ends and its reopening, sets ``reached`` and
    waits for the test to let go of the advisory lock ``_HOLD``."""

    def release(
        claims: Mapping[str, datetime], now: datetime, *, unpublish: bool
    ) -> transactions.Transaction[int]:
        (claimed,) = set(claims.values())  # one drain's claim
        params = {"ids": list(claims), "now": now, "claimed": claimed}
        for end in sql.RELEASE_ENDS:
            yield from transactions.count(end, params)
        reached.set()
        yield from transactions.fetch(sa.select(sa.func.pg_advisory_xact_lock(_HOLD)), {})
        reopen = sql.REOPEN_UNPUBLISHED if unpublish else sql.REOPEN
        return (yield from transactions.count(reopen, params))

    return release


async def test_a_give_back_racing_a_replacement_ends_the_older_and_reopens_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with postgres_schema() as schema:
        one = await SqlStore.connect(POSTGRES_URL, schema=schema)
        other = await SqlStore.connect(POSTGRES_URL, schema=schema)
        try:
            plain = await one.enqueue("dev-1", b"plain", 600)
            old = await one.enqueue_or_update("dev-1", "setpoint", b"old", 600)
            handed = await drained(one, "dev-1", [plain, old])
            assert len(handed) == 2
            reached = asyncio.Event()
            monkeypatch.setattr(transactions, "release", _paused_release(reached))
            async with other.engine.connect() as holder:
                await holder.execute(sa.select(sa.func.pg_advisory_lock(_HOLD)))
                giving_back = asyncio.create_task(one.release(handed, []))
                await asyncio.wait_for(reached.wait(), 10)
                new = await other.enqueue_or_update("dev-1", "setpoint", b"new", 600)
                await holder.execute(sa.select(sa.func.pg_advisory_unlock(_HOLD)))
            assert await asyncio.wait_for(giving_back, 10) == 1

            statuses = {
                name: await one.get_status(command_id)
                for name, command_id in (("plain", plain), ("old", old), ("new", new))
            }
        finally:
            await one.close()
            await other.close()

    assert statuses == {
        "plain": CommandStatus.PENDING,
        "old": CommandStatus.SUPERSEDED,
        "new": CommandStatus.PENDING,
    }
