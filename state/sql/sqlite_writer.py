"""The hot paths' write transactions on a SQLite file, each in one hop from the event loop.

A writer thread owns a sqlite3 connection to the engine's file, opened with the engine's
pragmas; a transaction of :mod:`amqp_queue.state.sql.transactions` (enqueue, the publish and
delivery marks, confirm, cancel) runs there as one function (``BEGIN IMMEDIATE``, its
statements, ``COMMIT``), its statements compiled once
(:class:`amqp_queue.state.sql.compiled.DriverSql`). Through aiosqlite the same
transaction costs a hop per statement, cursor and commit, each waiting for a turn of a busy
event loop: with delivery traffic on the loop, sequential enqueues and confirms run at
about half the rate or less without it (bench: enqueue, confirm).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncEngine

from ..cancellation import outlasting
from .compiled import DriverSql
from .engine import sqlite_pragmas
from .sqlite_direct import FAILURES, SqliteFile
from .transactions import Count, Fetch, Step, Transaction

T = TypeVar("T")


class SqliteWriter:
    """Runs write transactions on the writer thread; the caller serialises the calls."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._sql = DriverSql(engine.dialect)
        self._thread = _WriterThread(engine)

    async def run(self, transaction: Transaction[T]) -> T:
        """Runs ``transaction`` in one SQLite transaction on the writer thread; what it
        raises rolls it back and reaches the caller."""
        return await self._thread.run(functools.partial(self._run, transaction))

    async def close(self) -> None:
        """Closes the writer thread's connection; a later call opens a new one."""
        await self._thread.close()

    def _run(self, transaction: Transaction[T], connection: sqlite3.Connection) -> T:
        connection.execute("BEGIN IMMEDIATE")
        result: object = None
        while True:
            try:
                step = transaction.send(result)
            except StopIteration as done:
                connection.commit()
                return cast(T, done.value)
            result = self._execute(connection, step)

    def _execute(self, connection: sqlite3.Connection, step: Step) -> object:
        if isinstance(step, Fetch | Count):
            compiled, params = self._sql.prepare(step.statement, step.params)
            cursor = connection.execute(compiled.sql, params)
            if isinstance(step, Count):
                return cursor.rowcount
            return compiled.rows(cursor.fetchall())
        compiled = self._sql.compiled(step.statement)
        connection.executemany(compiled.sql, [compiled.params(row) for row in step.params])
        return None


class _WriterThread:
    """A sqlite3 connection to the engine's file, used only on a thread of its own.

    A whole transaction is one function run there: one hop from the event loop. Cancelling
    the caller does not stop it; it commits or rolls back by itself, and never leaves a
    transaction open on the connection; the caller raises once it has.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._file = SqliteFile.of(engine)
        self._pragmas = sqlite_pragmas(engine)
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None  # touched on the thread only

    async def run(self, transaction: Callable[[sqlite3.Connection], T]) -> T:
        """Runs ``transaction`` on the writer thread; what it raises reaches the caller.

        After a database failure the connection is closed (which rolls back what was open)
        and the next call opens a new one; after any other exception (a refused change) the
        transaction is rolled back and the connection kept.
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="state.sql.writer")
        loop = asyncio.get_running_loop()
        started = self._executor.submit(self._call, transaction)
        try:
            return await asyncio.wrap_future(started, loop=loop)
        except asyncio.CancelledError as cut:
            if started.cancel():  # still queued: it never runs
                raise
            # Begun, it commits or rolls back by itself: the cut caller raises once it has,
            # as on the engine's path, so a cut call (a cancel) has landed or not by then.
            ended = asyncio.wrap_future(started, loop=loop)
            await outlasting(ended)
            raise cut from (None if ended.cancelled() else ended.exception())

    async def close(self) -> None:
        """Closes the connection on its thread, after the calls already queued there."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # Queued before the shutdown, the close runs even if this caller is cancelled:
        # shielded, a cancellation cannot take it out of the queue either.
        closed = executor.submit(self._drop)
        executor.shutdown(wait=False)
        await asyncio.shield(asyncio.wrap_future(closed))

    def _call(self, transaction: Callable[[sqlite3.Connection], T]) -> T:
        if self._connection is None:
            self._connection = self._file.connect(self._pragmas)
        connection = self._connection
        try:
            return transaction(connection)
        except Exception as exc:
            if isinstance(exc, FAILURES):
                self._drop()
            elif connection.in_transaction:
                try:
                    connection.rollback()
                except BaseException:
                    self._drop()
                    raise
            raise
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
