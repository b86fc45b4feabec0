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
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from amqp_queue import CommandStatus, SqlStore
from tests.backends import POSTGRES_URL, postgres_schema
from tests.rabbitmq_support import rabbitmq_store

_TTL = 1.0
_HELD = 1.2  # past every command's TTL


def _asyncpg_url() -> str:
    return POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://")


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
    async with postgres_schema() as schema:
        async with await SqlStore.connect(POSTGRES_URL, schema=schema) as store:
            ids = [await store.enqueue("dev", b"%d" % n, _TTL) for n in range(3)]
            other = await asyncpg.connect(_asyncpg_url())
            try:
                locks = other.transaction()
                await locks.start()
                await other.fetch(f'SELECT id FROM "{schema}".command_queue FOR UPDATE')

                async def release() -> None:
                    await asyncio.sleep(_HELD)
                    await locks.commit()

                releasing = asyncio.ensure_future(release())
                assert await store.drain_pending("dev") == []
                await releasing
            finally:
                await other.close()
            assert [await store.get_status(i) for i in ids] == [CommandStatus.EXPIRED] * 3


async def test_a_hand_over_waiting_for_postgresql_row_locks(tmp_path: Path) -> None:
    """RabbitMQStore's drain: another transaction locks the rows the moment they are
    claimed, and holds them past their TTL; the hand-over hands none of them out."""
    async with postgres_schema() as schema:
        state_url = f"{POSTGRES_URL}?schema={schema}"
        async with rabbitmq_store(tmp_path, state_url=state_url) as store:
            ids = [await store.enqueue("dev", b"%d" % n, _TTL) for n in range(5)]
            other = await asyncpg.connect(_asyncpg_url())
            caught = asyncio.Event()

            async def lock_once_claimed() -> None:
                while True:
                    async with other.transaction():
                        try:
                            rows = await other.fetch(
                                f'SELECT id FROM "{schema}".command_queue WHERE '
                                "claimed_until IS NOT NULL AND NOT delivered "
                                "AND end_reason IS NULL FOR UPDATE NOWAIT"
                            )
                        except asyncpg.LockNotAvailableError:
                            rows = []
                        if rows:
                            caught.set()
                            await asyncio.sleep(_HELD)
                            return
                    await asyncio.sleep(0)

            try:
                locker = asyncio.ensure_future(lock_once_claimed())
                await asyncio.sleep(0.2)
                drained = await store.drain_commands("dev")
                returned_at = datetime.now(UTC)
                await asyncio.wait_for(locker, 5)
            finally:
                await other.close()
            assert caught.is_set()
            assert [r.id for r in drained if r.expires_at <= returned_at] == []
            statuses = {await store.get_status(i) for i in ids}
            assert statuses <= {CommandStatus.EXPIRED, CommandStatus.DELIVERED}
