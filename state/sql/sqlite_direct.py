"""The hot paths on a SQLite file, straight on the driver: fewer round trips to its thread.

aiosqlite runs every call in a thread of its own; through SQLAlchemy one write transaction
(``BEGIN IMMEDIATE``, an insert, ``COMMIT``) costs eight hops to that thread and back (a cursor
opened and closed per statement, the pool's reset on return), a one-statement read about
six, and at a hundred or more microseconds each they weigh more than the commit's fsync.
Here instead:

- :class:`SqliteWriter`: the inserts and replacements of ``enqueue``, the publish and delivery
  marks, confirm and cancel, each as one function run on a writer thread that owns its
  connection: ``BEGIN IMMEDIATE``, one ``executemany`` per statement, ``COMMIT``, in one hop.
- :class:`SqliteReader`: ``deliverable`` (what ``consume`` asks of each window) as one
  statement in autocommit mode, a consistent snapshot by itself (one hop), on a pooled
  connection the store keeps checked out.
- :class:`SqliteLiveCheck`: whether one command is still deliverable (what ``consume`` asks
  before each hand-out), read on the calling thread: a primary-key lookup in a WAL database
  takes about ten microseconds, a tenth of one hop to a driver thread.

The SQL is compiled by SQLAlchemy from the same table and predicates, and every value goes
through the column type's own bind and result processors, so rows are stored and read
exactly as on the SQLAlchemy path.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlalchemy.sql.compiler import SQLCompiler

from ..model import EndReason
from .engine import sqlite_pragmas
from .schema import IS_OPEN, IS_READY, command_queue

c = command_queue.c

_MOST_PADDED = 16_384

FAILURES = (sqlite3.Error, OSError)
"""What the driver raises when the database fails."""

T = TypeVar("T")


def usable(engine: AsyncEngine) -> bool:
    """Whether ``engine`` is a SQLite file with a pool of separate connections.

    An in-memory database lives in one shared connection; it keeps the SQLAlchemy path.
    """
    url = engine.url
    database = url.database or ""
    return (
        url.get_backend_name() == "sqlite"
        and url.get_driver_name() == "aiosqlite"
        and database != ""
        and ":memory:" not in database
        and "mode=memory" not in database
        and url.query.get("mode") != "memory"
        and not isinstance(engine.sync_engine.pool, StaticPool | SingletonThreadPool)
    )


class _Statement:
    """A compiled statement and the bind processors of its parameters, in position order."""

    def __init__(
        self,
        statement: sa.ClauseElement,
        types: dict[str, Any],
        dialect: Dialect,
        column_keys: list[str] | None = None,
    ) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=column_keys))
        self.sql = compiled.string
        self._names = list(compiled.positiontup or [])
        self._processors = [
            types[name].dialect_impl(dialect).bind_processor(dialect) for name in self._names
        ]
        self._steps = list(zip(self._names, self._processors, strict=True))

    def params(self, values: dict[str, Any]) -> tuple[Any, ...]:
        # Once per row of every batch: a plain comprehension, no generator machinery.
        return tuple(
            [
                values[name] if process is None else process(values[name])
                for name, process in self._steps
            ]
        )


class _Dedicated:
    """One pooled connection kept checked out; handed back on close or after a failure."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._connection: AsyncConnection | None = None
        self._driver: Any = None
        self._opening = asyncio.Lock()

    async def driver(self) -> Any:
        """The aiosqlite connection under it."""
        if self._driver is None:
            async with self._opening:
                if self._driver is None:
                    connection = await self._engine.connect()
                    try:
                        raw = await connection.get_raw_connection()
                    except BaseException:
                        await connection.close()
                        raise
                    self._connection, self._driver = connection, raw.driver_connection
        return self._driver

    async def close(self) -> None:
        connection, self._connection, self._driver = self._connection, None, None
        if connection is not None:
            await connection.close()

    async def discard(self) -> None:
        """Drops the connection: after a failure, whatever state it is in is not reused."""
        connection, self._connection, self._driver = self._connection, None, None
        if connection is not None:
            try:
                await connection.invalidate()
            finally:
                await connection.close()


class _WriterThread:
    """A sqlite3 connection to the engine's file, used only on a thread of its own.

    A whole transaction is one function run there: one hop from the event loop. Cancelling
    the caller does not stop it; it commits or rolls back by itself, and never leaves a
    transaction open on the connection.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        # The file as the engine's own connections open it (see SqliteLiveCheck), with the
        # same pragmas.
        args, options = engine.dialect.create_connect_args(engine.url)
        self._path: str = args[0]
        self._uri = bool(options.get("uri", False))
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
        return await loop.run_in_executor(self._executor, self._call, transaction)

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
            self._connection = self._open()
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

    def _open(self) -> sqlite3.Connection:
        # Autocommit, so that the transactions' own BEGIN IMMEDIATE is the only BEGIN.
        connection = sqlite3.connect(self._path, isolation_level=None, uri=self._uri)
        try:
            for pragma in self._pragmas:
                connection.execute(pragma)
        except BaseException:
            connection.close()
            raise
        return connection

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


class SqliteReader:
    """``deliverable`` in one statement and one hop; calls may run concurrently."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._dialect = engine.dialect
        self._connection = _Dedicated(engine)
        self._columns = [column for column in command_queue.columns if column.name != "seq"]
        self._results = [
            column.type.dialect_impl(self._dialect).result_processor(self._dialect, None)
            for column in self._columns
        ]
        self._id = c.id.type.dialect_impl(self._dialect).bind_processor(self._dialect)
        self._time = c.expires_at.type.dialect_impl(self._dialect).bind_processor(self._dialect)
        self._sql: dict[int, str] = {}

    async def deliverable(self, command_ids: Sequence[str], now: datetime) -> list[dict[str, Any]]:
        """Rows (column name to value) of the open, ready, unexpired commands among these."""
        ids = [each if self._id is None else self._id(each) for each in command_ids]
        # Padded to a power of two with a repeated id (harmless in IN): a few statements
        # serve every window size, each compiled once.
        size = 1 << (len(ids) - 1).bit_length()
        if size > _MOST_PADDED:
            size = len(ids)  # SQLite allows 32,766 parameters; a window this wide is rare.
        ids.extend(ids[:1] * (size - len(ids)))
        sql = self._deliverable_sql(size)
        at = now if self._time is None else self._time(now)
        driver = await self._connection.driver()
        try:
            rows = await driver.execute_fetchall(sql, (*ids, at))
        except BaseException:
            await self._connection.discard()
            raise
        names = [column.name for column in self._columns]
        return [
            {
                name: value if process is None else process(value)
                for name, value, process in zip(names, row, self._results, strict=True)
            }
            for row in rows
        ]

    async def close(self) -> None:
        await self._connection.close()

    def _deliverable_sql(self, count: int) -> str:
        """The query for ``count`` ids (a power of two), compiled once."""
        sql = self._sql.get(count)
        if sql is None:
            sql = self._sql[count] = self._compile_deliverable(count)
        return sql

    def _compile_deliverable(self, count: int) -> str:
        query = sa.select(*self._columns).where(
            c.id.in_([sa.bindparam(f"id_{index}") for index in range(count)]),
            IS_OPEN,
            IS_READY,
            c.expires_at > sa.bindparam("now"),
        )
        compiled = query.compile(dialect=self._dialect)
        if list(compiled.positiontup or []) != [*(f"id_{i}" for i in range(count)), "now"]:
            raise AssertionError("unexpected parameter order in the compiled query")
        return compiled.string


class SqliteLiveCheck:
    """Whether a command is open, ready and unexpired: one indexed lookup, no thread hop.

    Its own read-only connection, used from the event loop's thread. In WAL mode a reader
    never waits for the writer; should SQLite still answer busy (recovering a WAL another
    process left), :meth:`is_live` returns None and the caller asks on a driver thread.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        dialect = engine.dialect
        # The file as the engine's own connections open it: a plain path made absolute when
        # the engine was created; a relative path in URI mode, like theirs, resolved against
        # the working directory of each open.
        args, options = dialect.create_connect_args(engine.url)
        self._path: str = args[0]
        self._uri = bool(options.get("uri", False))
        self._closed = False
        query = sa.select(c.id).where(
            c.id == sa.bindparam("command_id"),
            IS_OPEN,
            IS_READY,
            c.expires_at > sa.bindparam("now"),
        )
        self._statement = _Statement(
            query, {"command_id": c.id.type, "now": c.expires_at.type}, dialect
        )
        self._connection: sqlite3.Connection | None = None

    def is_live(self, command_id: str, now: datetime) -> bool | None:
        """True or False; None when it cannot answer without waiting (SQLite busy) or at
        all (closed): the caller then asks on a driver thread."""
        if self._closed:
            return None
        if self._connection is None:
            self._connection = self._open()
        params = self._statement.params({"command_id": command_id, "now": now})
        try:
            row = self._connection.execute(self._statement.sql, params).fetchone()
        except sqlite3.OperationalError as exc:
            # The primary code is the low byte (SQLITE_BUSY_RECOVERY is a kind of SQLITE_BUSY).
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return None
            self._drop()
            raise
        return row is not None

    def close(self) -> None:
        """Closes the connection for good: a stream outliving its store never reopens it."""
        self._closed = True
        self._drop()

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _open(self) -> sqlite3.Connection:
        # Autocommit: each lookup is its own snapshot and holds no read lock afterwards, so
        # it never keeps a checkpoint from finishing. Not waiting: busy means fall back.
        connection = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, uri=self._uri
        )
        try:
            connection.execute("PRAGMA query_only=ON")
            connection.execute("PRAGMA busy_timeout=0")
        except BaseException:
            connection.close()
            raise
        return connection


class SqliteWriter:
    """Write transactions in one hop each, on a connection of their own; the caller
    serialises the calls."""

    def __init__(self, engine: AsyncEngine) -> None:
        dialect = engine.dialect
        columns = {column.name: column.type for column in command_queue.columns}
        del columns["seq"]
        self._insert = _Statement(sa.insert(command_queue), columns, dialect, list(columns))
        self._published = _Statement(
            sa.update(command_queue)
            .where(c.id == sa.bindparam("command_id"))
            .values(published_at=sa.bindparam("at")),
            {"command_id": c.id.type, "at": c.published_at.type},
            dialect,
        )
        self._delivered = _Statement(
            sa.update(command_queue)
            .where(c.id == sa.bindparam("command_id"), IS_OPEN)
            .values(delivered=sa.true(), ended_at=sa.bindparam("at")),
            {"command_id": c.id.type, "at": c.ended_at.type},
            dialect,
        )
        slot_types = {
            "device": c.device_id.type,
            "kind": c.command_type.type,
            "at": c.ended_at.type,
            "reason": c.end_reason.type,
        }
        in_slot = sa.and_(
            c.device_id == sa.bindparam("device"), c.command_type == sa.bindparam("kind"), IS_OPEN
        )
        # Two statements, so that the first one's row count is the number superseded.
        self._supersede = _Statement(
            sa.update(command_queue)
            .where(in_slot, c.expires_at > sa.bindparam("at"))
            .values(end_reason=sa.bindparam("reason"), ended_at=sa.bindparam("at")),
            slot_types,
            dialect,
        )
        self._expire_replaced = _Statement(
            sa.update(command_queue)
            .where(in_slot, c.expires_at <= sa.bindparam("at"))
            .values(end_reason=sa.bindparam("reason"), ended_at=sa.bindparam("at")),
            slot_types,
            dialect,
        )
        self._dialect = dialect
        self._types = columns
        self._row_columns = list(columns)
        self._results = [
            columns[name].dialect_impl(dialect).result_processor(dialect, None)
            for name in self._row_columns
        ]
        self._select_one = _Statement(
            sa.select(*(c[name] for name in self._row_columns)).where(
                c.id == sa.bindparam("command_id")
            ),
            {"command_id": c.id.type},
            dialect,
        )
        self._updates: dict[tuple[str, ...], _Statement] = {}
        self._connection = _WriterThread(engine)

    async def modify(
        self,
        command_id: str,
        change: Callable[[dict[str, Any]], dict[str, Any] | None],
    ) -> None:
        """Reads a command's row under the write lock, asks ``change`` for the columns to
        set, and sets them, in one transaction (one hop; ``change`` runs on the writer
        thread).

        ``change`` gets the row as read (column name to value) and is not called when there
        is none. What it raises rolls the transaction back and reaches the caller.
        """
        select = self._select_one.params({"command_id": command_id})

        def transaction(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN IMMEDIATE")
            row = connection.execute(self._select_one.sql, select).fetchone()
            changes = None if row is None else change(self._as_columns(row))
            if changes:
                update = self._update(tuple(sorted(changes)))
                connection.execute(update.sql, update.params({**changes, "command_id": command_id}))
            connection.commit()

        await self._connection.run(transaction)

    def _as_columns(self, row: Sequence[Any]) -> dict[str, Any]:
        return {
            name: value if process is None else process(value)
            for name, value, process in zip(self._row_columns, row, self._results, strict=True)
        }

    def _update(self, names: tuple[str, ...]) -> _Statement:
        """The UPDATE of these columns by command id, compiled once per set of columns."""
        statement = self._updates.get(names)
        if statement is None:
            statement = _Statement(
                sa.update(command_queue)
                .where(c.id == sa.bindparam("command_id"))
                .values({name: sa.bindparam(name) for name in names}),
                {**{name: self._types[name] for name in names}, "command_id": c.id.type},
                self._dialect,
            )
            self._updates[names] = statement
        return statement

    async def write(
        self,
        rows: Sequence[dict[str, Any]],
        published: Collection[str],
        at: datetime,
        *,
        replaced: Collection[tuple[str, str]] = (),
    ) -> int:
        """In one transaction: ends the open command of each ``(device_id, command_type)``
        slot in ``replaced``, inserts rows (``command_queue`` columns but ``seq``) and marks
        commands published ``at``. Returns how many unexpired commands it superseded."""
        steps = []
        ends = ((self._supersede, EndReason.SUPERSEDED), (self._expire_replaced, EndReason.EXPIRED))
        for statement, reason in ends if replaced else ():
            values = {"at": at, "reason": reason.value}
            steps.append(
                (
                    statement.sql,
                    [statement.params({**values, "device": d, "kind": k}) for d, k in replaced],
                )
            )
        if rows:
            steps.append((self._insert.sql, [self._insert.params(row) for row in rows]))
        if published:
            steps.append(self._marks(self._published, published, at))
        changed = await self._run(steps)
        return changed[0] if replaced else 0

    async def mark_delivered(self, command_ids: Collection[str], at: datetime) -> int:
        return sum(await self._run([self._marks(self._delivered, command_ids, at)]))

    async def close(self) -> None:
        """Closes the writer thread's connection; a later call opens a new one."""
        await self._connection.close()

    @staticmethod
    def _marks(
        statement: _Statement, command_ids: Collection[str], at: datetime
    ) -> tuple[str, list[tuple[Any, ...]]]:
        return statement.sql, [
            statement.params({"command_id": each, "at": at}) for each in command_ids
        ]

    async def _run(self, steps: list[tuple[str, list[tuple[Any, ...]]]]) -> list[int]:
        """Runs each statement over its rows in one transaction; returns each one's rows
        changed."""
        if not steps:
            return []

        def transaction(connection: sqlite3.Connection) -> list[int]:
            connection.execute("BEGIN IMMEDIATE")
            changed = [connection.executemany(sql, rows).rowcount for sql, rows in steps]
            connection.commit()
            return changed

        return await self._connection.run(transaction)
