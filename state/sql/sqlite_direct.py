"""The hot paths on a SQLite file, straight on the driver: fewer round trips to its thread.

aiosqlite runs every call in a thread of its own; through SQLAlchemy one write transaction
(``BEGIN IMMEDIATE``, an insert, ``COMMIT``) costs eight hops to that thread and back (a cursor
opened and closed per statement, the pool's reset on return), a one-statement read about
six, and at a hundred or more microseconds each they weigh more than the commit's fsync.
Here instead:

- :class:`SqliteWriter`: the hot write transactions of
  :mod:`amqp_queue.state.sql.transactions` (enqueue, the publish and delivery marks,
  confirm and cancel), each run on a writer thread that owns its connection:
  ``BEGIN IMMEDIATE``, its statements, ``COMMIT``, in one hop.
- :class:`SqliteReader`: ``deliverable`` (what ``consume`` asks of each window) as one
  statement in autocommit mode, a consistent snapshot by itself (one hop), on a pooled
  connection the store keeps checked out.
- :class:`SqliteLiveCheck`: whether one command is still deliverable (what ``consume`` asks
  before each hand-out), read on the calling thread: a primary-key lookup in a WAL database
  takes about ten microseconds, a tenth of one hop to a driver thread.

They execute the constructs of :mod:`amqp_queue.state.sql.statements`, compiled here by
SQLAlchemy for the engine's dialect, and every value goes through the column type's own bind
and result processors, so rows are stored and read exactly as on the SQLAlchemy path.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlalchemy.sql.compiler import SQLCompiler

from . import statements as sql
from .engine import sqlite_pragmas
from .transactions import Count, Fetch, Step, Transaction

FAILURES = (sqlite3.Error, OSError)
"""What the driver raises when the database fails."""

# IN lists are padded to a power of two with a repeated value (harmless in IN), so a few
# compiled statements serve every size; beyond this, each size is its own (SQLite allows
# 32,766 parameters; a list this long is rare).
_MOST_PADDED = 16_384


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


@dataclass(frozen=True, slots=True)
class SqliteFile:
    """The file as the engine's own connections open it: a plain path made absolute when
    the engine was created; a relative path in URI mode, like theirs, resolved against the
    working directory of each open. Taken when the store is made, as the engine's was."""

    path: str
    uri: bool

    @classmethod
    def of(cls, engine: AsyncEngine) -> SqliteFile:
        args, options = engine.dialect.create_connect_args(engine.url)
        return cls(args[0], bool(options.get("uri", False)))

    def connect(
        self, pragmas: Iterable[str], *, check_same_thread: bool = True
    ) -> sqlite3.Connection:
        """A connection in autocommit mode: every BEGIN is the caller's."""
        connection = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=check_same_thread, uri=self.uri
        )
        try:
            for pragma in pragmas:
                connection.execute(pragma)
        except BaseException:
            connection.close()
            raise
        return connection


_Step = tuple[str | None, int | None, Any, Any]
"""Where a positional parameter comes from: its bind parameter's name (None: a value built
into the construct), its index in an expanding list, its bind processor, the built-in value."""


class Compiled:
    """One statement compiled for the driver: its SQL, its parameters in position order
    through their bind processors, and its rows through their result processors."""

    __slots__ = ("_columns", "_plain", "_steps", "expanding", "sql")

    def __init__(
        self, sql: str, steps: list[_Step], columns: list[tuple[str, Any]], expanding: list[str]
    ) -> None:
        self.sql = sql
        self.expanding = expanding
        """The names of its expanding (``IN``) parameters."""
        self._steps = steps
        # Every parameter straight from one value: the common case, made fast.
        plain = [(name, process) for name, index, process, _ in steps if index is None and name]
        self._plain = plain if len(plain) == len(steps) else None
        self._columns = columns

    def params(self, values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional parameters for ``values`` (bind parameter name to value)."""
        if self._plain is not None:
            # Once per row of every batch insert: a plain comprehension.
            return tuple(
                [
                    values[name] if process is None else process(values[name])
                    for name, process in self._plain
                ]
            )
        out: list[Any] = []
        for name, index, process, constant in self._steps:
            if name is None:
                out.append(constant)
                continue
            value = values[name] if index is None else values[name][index]
            out.append(value if process is None else process(value))
        return tuple(out)

    def rows(self, fetched: Iterable[Sequence[Any]]) -> list[dict[str, Any]]:
        """The rows the driver returned, as column name to value."""
        return [
            {
                name: value if process is None else process(value)
                for (name, process), value in zip(self._columns, row, strict=True)
            }
            for row in fetched
        ]


class SqliteSql:
    """Constructs compiled for one SQLite dialect, each once (per padded ``IN`` size)."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._compiled: dict[tuple[int, tuple[int, ...]], tuple[sa.Executable, Compiled]] = {}

    def prepare(
        self, statement: sa.Executable, values: Mapping[str, Any]
    ) -> tuple[Compiled, tuple[Any, ...]]:
        """The compiled statement and its positional parameters for ``values``."""
        compiled = self.compiled(statement)
        if compiled.expanding:
            values = {**values, **{name: _padded(values[name]) for name in compiled.expanding}}
            compiled = self.compiled(
                statement, tuple(len(values[name]) for name in compiled.expanding)
            )
        return compiled, compiled.params(values)

    def compiled(self, statement: sa.Executable, sizes: tuple[int, ...] = ()) -> Compiled:
        """``statement`` compiled, with its expanding parameters (in
        :attr:`Compiled.expanding` order) of these sizes."""
        key = (id(statement), sizes)
        cached = self._compiled.get(key)
        if cached is None:
            # The construct is kept with it, so its id is never reused while cached.
            cached = self._compiled[key] = (statement, self._compile(statement, sizes))
        return cached[1]

    def _compile(self, statement: sa.Executable, sizes: tuple[int, ...]) -> Compiled:
        dialect = self._dialect
        compiled = cast(SQLCompiler, cast(sa.ClauseElement, statement).compile(dialect=dialect))
        binds = compiled.binds
        expanding = sorted({bind.key for bind in binds.values() if bind.expanding})
        sql, names = compiled.string, list(compiled.positiontup or [])
        origin: dict[str, tuple[str, int]] = {}
        if sizes:
            dummy: dict[str, Any] = {name: None for name, bind in binds.items() if bind.required}
            dummy.update({name: [None] * size for name, size in zip(expanding, sizes, strict=True)})
            expanded = compiled.construct_expanded_state(dummy)
            sql, names = expanded.statement, list(expanded.positiontup or [])
            for name, each in expanded.parameter_expansion.items():
                origin.update({new: (name, index) for index, new in enumerate(each)})
        steps: list[_Step] = []
        for name in names:
            base, index = origin.get(name, (name, None))
            bind = binds[base]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.required:
                steps.append((base, index, process, None))
            else:  # a value built into the construct (a reason, a role)
                value = bind.effective_value
                steps.append((None, None, None, value if process is None else process(value)))
        columns = [
            (name, column.type.dialect_impl(dialect).result_processor(dialect, None))
            for name, column in cast(Any, statement).exported_columns.items()
        ]
        return Compiled(sql, steps, columns, expanding)


def _padded(values: list[Any]) -> list[Any]:
    if not values:
        return values
    size = 1 << (len(values) - 1).bit_length()
    if size > _MOST_PADDED:
        return values
    return values + values[:1] * (size - len(values))


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


class SqliteReader:
    """``deliverable`` in one statement and one hop; calls may run concurrently."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._sql = SqliteSql(engine.dialect)
        self._connection = _Dedicated(engine)

    async def deliverable(self, command_ids: Sequence[str], now: datetime) -> list[dict[str, Any]]:
        """Rows (column name to value) of the open, ready and unexpired commands among these."""
        values = {"ids": list(command_ids), "now": now}
        compiled, params = self._sql.prepare(sql.DELIVERABLE, values)
        driver = await self._connection.driver()
        try:
            rows = await driver.execute_fetchall(compiled.sql, params)
        except BaseException:
            await self._connection.discard()
            raise
        return compiled.rows(rows)

    async def close(self) -> None:
        await self._connection.close()


class SqliteLiveCheck:
    """Whether a command is open, ready and unexpired: one indexed lookup, no thread hop.

    Its own read-only connection, used from the event loop's thread. In WAL mode a reader
    never waits for the writer; should SQLite still answer busy (recovering a WAL another
    process left), :meth:`is_live` returns None and the caller asks on a driver thread.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._file = SqliteFile.of(engine)
        self._sql = SqliteSql(engine.dialect)
        self._closed = False
        self._connection: sqlite3.Connection | None = None

    def is_live(self, command_id: str, now: datetime) -> bool | None:
        """True or False; None when it cannot answer without waiting (SQLite busy) or at
        all (closed): the caller then asks on a driver thread."""
        if self._closed:
            return None
        if self._connection is None:
            # Autocommit: each lookup is its own snapshot and holds no read lock afterwards,
            # so it never keeps a checkpoint from finishing. Not waiting: busy means fall back.
            self._connection = self._file.connect(
                ("PRAGMA query_only=ON", "PRAGMA busy_timeout=0"),
                check_same_thread=False,
            )
        compiled, params = self._sql.prepare(sql.LIVE, {"command_id": command_id, "now": now})
        try:
            row = self._connection.execute(compiled.sql, params).fetchone()
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


T = TypeVar("T")


class SqliteWriter:
    """Runs write transactions on the writer thread; the caller serialises the calls."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._sql = SqliteSql(engine.dialect)
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
    transaction open on the connection.
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
