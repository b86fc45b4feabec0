"""The SQLite writer thread: a transaction per hop, on a connection set up like the engine's."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from amqp_queue.state import SqlStore
from amqp_queue.state.sql.sqlite_writer import _WriterThread

INSERT = "INSERT INTO notes (text) VALUES (?)"


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[_WriterThread]:
    async with await SqlStore.connect(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}") as store:
        thread = _WriterThread(store.engine)
        await thread.run(lambda connection: connection.execute("CREATE TABLE notes (text TEXT)"))
        try:
            yield thread
        finally:
            await thread.close()


def _mark(connection: sqlite3.Connection) -> None:
    """Tags the connection: a TEMP table lives and dies with the connection that made it."""
    connection.execute("CREATE TEMP TABLE tag (x)")


def _tagged(connection: sqlite3.Connection) -> bool:
    found = connection.execute("SELECT count(*) FROM temp.sqlite_master WHERE name = 'tag'")
    return bool(found.fetchone()[0])


def _notes(connection: sqlite3.Connection) -> list[str]:
    return [text for (text,) in connection.execute("SELECT text FROM notes ORDER BY rowid")]


@pytest.mark.parametrize(("query", "level"), [("", 2), ("?synchronous=normal", 1)])
async def test_the_writer_opens_its_connection_with_the_engines_pragmas(
    tmp_path: Path, query: str, level: int
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}{query}"
    async with await SqlStore.connect(url) as store:
        thread = _WriterThread(store.engine)
        try:
            settings = await thread.run(
                lambda connection: [
                    connection.execute(f"PRAGMA {name}").fetchone()[0]
                    for name in ("synchronous", "journal_mode", "busy_timeout", "foreign_keys")
                ]
            )
        finally:
            await thread.close()
    assert settings == [level, "wal", 10_000, 1]


async def test_a_refused_change_rolls_back_and_keeps_the_connection(
    writer: _WriterThread,
) -> None:
    def refused(connection: sqlite3.Connection) -> int:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(INSERT, ("refused",))
        raise ValueError("not allowed")

    await writer.run(_mark)
    with pytest.raises(ValueError, match="not allowed"):
        await writer.run(refused)

    assert await writer.run(_tagged) is True
    assert await writer.run(lambda connection: connection.in_transaction) is False
    assert await writer.run(_notes) == []


async def test_a_database_failure_drops_the_connection_and_the_next_call_opens_one(
    writer: _WriterThread, tmp_path: Path
) -> None:
    def failing(connection: sqlite3.Connection) -> None:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(INSERT, ("lost",))
        connection.execute("INSERT INTO missing VALUES (1)")

    await writer.run(_mark)
    with pytest.raises(sqlite3.OperationalError, match="missing"):
        await writer.run(failing)

    # The write lock went with the closed connection: another writer gets it at once.
    other = sqlite3.connect(tmp_path / "c.db", isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert await writer.run(_tagged) is False
    assert await writer.run(_notes) == []


async def test_a_cancelled_caller_raises_once_its_transaction_finished_by_itself(
    writer: _WriterThread,
) -> None:
    """The transaction is not stopped; the caller raises only once it committed, so a cut
    call's outcome is known then (it used to raise at once: tests/test_cut_cancel_sqlite.py)."""
    started = asyncio.Event()
    finish = threading.Event()
    loop = asyncio.get_running_loop()

    def slow(connection: sqlite3.Connection) -> None:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(INSERT, ("slow",))
        loop.call_soon_threadsafe(started.set)
        assert finish.wait(5), "the test never let the transaction finish"
        connection.commit()

    call = asyncio.create_task(writer.run(slow))
    await started.wait()
    call.cancel()
    await asyncio.sleep(0.2)
    assert not call.done(), "the cut caller raised while its transaction still ran"
    finish.set()
    with pytest.raises(asyncio.CancelledError):
        await call

    # The next transaction runs after it on the same thread, on a connection left clean.
    assert await writer.run(lambda connection: connection.in_transaction) is False
    assert await writer.run(_notes) == ["slow"]


async def test_a_cancelled_close_still_closes_the_connection(writer: _WriterThread) -> None:
    started = asyncio.Event()
    finish = threading.Event()
    loop = asyncio.get_running_loop()

    def slow(connection: sqlite3.Connection) -> None:
        loop.call_soon_threadsafe(started.set)
        assert finish.wait(5), "the test never let the call finish"

    call = asyncio.create_task(writer.run(slow))
    await started.wait()
    closing = asyncio.create_task(writer.close())
    await asyncio.sleep(0)  # one step: the close is queued behind the slow call
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    finish.set()  # only now: the close was cancelled while queued
    await call

    # The close was queued behind the slow call; it runs once that returns.
    give_up = time.monotonic() + 5
    while writer._connection is not None:
        assert time.monotonic() < give_up, "the cancelled close never closed the connection"
        await asyncio.sleep(0.01)
