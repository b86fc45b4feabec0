"""Expiry checked at the time a drain got its locks, not the time it started.

Found by a helper's public-API probe: the SQL store read its clock before a drain's
transaction waited for the database (SQLite's write lock held by another process, a row
lock held by another PostgreSQL transaction), then handed over every command that expired
during the wait, marked ``DELIVERED`` (0.5 to 0.8 s past their TTL, 4 of 4 runs each).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from amqp_queue import CommandStatus, SqlStore
from tests.backends import POSTGRES_URL, postgres_schema

_TTL = 1.0
_HELD = 1.2  # past every command's TTL


@asynccontextmanager
async def _rows_locked_by_another_transaction(schema: str) -> AsyncIterator[None]:
    """Every row locked (not changed) by another connection's transaction for ``_HELD``
    seconds from now; the block runs meanwhile, and its end waits for the release."""
    other = await asyncpg.connect(POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        locks = other.transaction()
        await locks.start()
        await other.fetch(f'SELECT id FROM "{schema}".command_queue FOR UPDATE')

        async def release() -> None:
            await asyncio.sleep(_HELD)
            await locks.commit()

        releasing = asyncio.ensure_future(release())
        yield
        await releasing
    finally:
        await other.close()


async def test_a_bare_drain_waiting_for_sqlite_s_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    async with await SqlStore.connect(f"sqlite+aiosqlite:///{path}") as store:
        ids = [await store.enqueue("dev", b"%d" % n, _TTL) for n in range(3)]
        taken = threading.Event()

        def other_process() -> None:
            connection = sqlite3.connect(path)
            connection.execute("BEGIN IMMEDIATE")
            taken.set()
            time.sleep(_HELD)
            connection.commit()
            connection.close()

        holder = asyncio.ensure_future(asyncio.to_thread(other_process))
        await asyncio.to_thread(taken.wait)
        assert await store.drain_pending("dev") == []
        await holder
        assert [await store.get_status(i) for i in ids] == [CommandStatus.EXPIRED] * 3


async def test_a_bare_drain_waiting_for_postgresql_row_locks() -> None:
    async with (
        postgres_schema() as schema,
        await SqlStore.connect(POSTGRES_URL, schema=schema) as store,
    ):
        ids = [await store.enqueue("dev", b"%d" % n, _TTL) for n in range(3)]
        async with _rows_locked_by_another_transaction(schema):
            assert await store.drain_pending("dev") == []
        assert [await store.get_status(i) for i in ids] == [CommandStatus.EXPIRED] * 3


async def test_a_hand_over_waiting_for_postgresql_row_locks() -> None:
    """The second phase of a drain (RabbitMQStore's): another transaction locks the claimed
    rows without changing them, and holds them past their TTL; the hand-over waiting for
    them hands none of them out."""
    async with (
        postgres_schema() as schema,
        await SqlStore.connect(POSTGRES_URL, schema=schema) as store,
    ):
        ids = [await store.enqueue("dev", b"%d" % n, _TTL) for n in range(5)]
        claimed = await store.claim("dev")
        assert [record.id for record in claimed] == ids
        async with _rows_locked_by_another_transaction(schema):
            assert await store.hand_over(claimed) == []
        await store.release(claimed, ())
        assert [await store.get_status(i) for i in ids] == [CommandStatus.EXPIRED] * 5


async def test_the_store_s_clock_is_read_on_the_event_loop_only(tmp_path: Path) -> None:
    """A drain reads its now once it holds SQLite's write lock, on the writer thread: from
    the store's clock read on the loop, advanced by the time elapsed (the application's
    clock may need the event loop; a first version called it on the writer thread)."""

    def loop_clock() -> datetime:
        asyncio.get_running_loop()  # raises off the event loop's thread
        return datetime.now(UTC)

    url = f"sqlite+aiosqlite:///{tmp_path / 'clock.db'}"
    async with await SqlStore.connect(url, clock=loop_clock) as store:
        await store.enqueue("dev", b"x", 600)
        assert await store.drain_pending("dev") == [b"x"]
        await store.enqueue("dev", b"y", 600)
        claimed = await store.claim("dev")
        assert [record.payload for record in await store.hand_over(claimed)] == [b"y"]
