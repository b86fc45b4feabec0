"""PostgreSQL aborts a deadlock victim; the index runs that write transaction again.

Seen for real under the fault harness: a delivery mark died as a deadlock victim, so a
command the device had was later cancelled. Here the deadlock is made on purpose: another
transaction holds a row the store's write needs, and then asks for the row the store holds.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from amqp_queue.state import CommandStatus, SqlStore
from amqp_queue.state.sql import deadlock_retry
from tests.backends import POSTGRES_URL, postgres_schema


async def _wait_until_blocked(admin: AsyncConnection, schema: str) -> None:
    """Returns once a statement on ``schema`` waits for a row lock."""
    waiting = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND query LIKE :pattern"
    )
    give_up = time.monotonic() + 10
    while True:
        blocked = await admin.scalar(waiting, {"pattern": f"%{schema}.command_queue%"})
        # pg_stat_activity is read once per transaction: a new one sees the present.
        await admin.rollback()
        if blocked:
            return
        assert time.monotonic() < give_up, "the store's write never waited for the held row"
        await asyncio.sleep(0.02)


async def test_a_write_chosen_as_deadlock_victim_runs_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = create_async_engine(POSTGRES_URL)
    try:
        async with (
            postgres_schema() as schema,
            await SqlStore.connect(POSTGRES_URL, schema=schema) as store,
            engine.connect() as other,
            engine.connect() as watcher,
        ):
            replaced = await store.enqueue_or_update("dev-1", "setpoint", b"20", 60)
            published = await store.enqueue("dev-1", b"plain", 60)
            table = f'"{schema}".command_queue'
            touch = sa.text(f"UPDATE {table} SET payload = payload WHERE id = :id")

            # The other transaction never gives up first: the store's wait is the one that
            # reaches deadlock_timeout and finds the cycle.
            await other.execute(sa.text("SET deadlock_timeout = '30s'"))
            await other.execute(touch, {"id": published})
            # One transaction: supersede `replaced` (its row locked), then mark `published`
            # (held by the other transaction: the store waits).
            record = store.build("dev-1", "setpoint", b"21", 60)
            write = asyncio.create_task(store.write([record], [published]))
            try:
                await _wait_until_blocked(watcher, schema)
                # Now the other transaction asks for the row the store holds: a cycle.
                with caplog.at_level(logging.WARNING, logger="amqp_queue.state.sql"):
                    # Granted once PostgreSQL aborts the store's attempt.
                    await other.execute(touch, {"id": replaced})
                    await other.commit()
                    superseded = await write
            finally:
                if not write.done():
                    await other.rollback()  # lets the store's write end, whatever it does
                    await asyncio.wait({write})

            assert superseded == 1
            assert any("deadlock detected" in message for message in caplog.messages)
            assert await store.get_status(replaced) is CommandStatus.SUPERSEDED
            assert await store.get_status(record.id) is CommandStatus.PENDING
            stored = await store.get(published)
            assert stored is not None
            assert stored.published_at is not None
    finally:
        await engine.dispose()


async def test_only_deadlocks_and_serialization_failures_count_as_transient() -> None:
    engine = create_async_engine(POSTGRES_URL)
    try:
        async with engine.connect() as conn:
            for sqlstate, retried in (("40P01", True), ("40001", True), ("23505", False)):
                raise_it = sa.text(
                    f"DO $$ BEGIN RAISE EXCEPTION 'made here' USING ERRCODE = '{sqlstate}'; END $$"
                )
                with pytest.raises(DBAPIError) as caught:
                    await conn.execute(raise_it)
                await conn.rollback()
                assert deadlock_retry.is_transient(caught.value) is retried, sqlstate
    finally:
        await engine.dispose()
