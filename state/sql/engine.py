"""Engines for the state index: SQLite (aiosqlite) tuned on purpose, PostgreSQL (asyncpg)."""

from __future__ import annotations

import asyncio
import weakref
from threading import Thread
from typing import Any

import aiosqlite
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

_BROKEN_MID_CALL: tuple[type[Exception], ...]
try:
    from asyncpg import InternalClientError
except ImportError:  # the postgres extra is not installed
    _BROKEN_MID_CALL = ()
else:
    _BROKEN_MID_CALL = (InternalClientError,)

READ_ONLY = "amqp_queue_read_only"
"""Execution option: the transaction only reads (SQLite then takes no write lock)."""

# Each pragma, and why:
# - journal_mode=WAL: readers never block the writer nor the writer the readers, so
#   get_pending and status lookups run while a drain or an enqueue batch commits.
# - synchronous=FULL (the default, see SYNCHRONOUS): enqueue promises the command is durable
#   when it returns; in WAL mode NORMAL can lose the last commits on power loss. Group commit
#   pays the fsync once a batch.
# - busy_timeout=10000: another process's writer makes us wait instead of failing at once.
# - foreign_keys=ON: the table has none, but it is the safe default should one be added.
_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA foreign_keys=ON",
)

SYNCHRONOUS = ("full", "normal")
"""SQLite ``synchronous`` levels the index accepts, safest first.

``full`` (default): a commit is fsynced before it returns, so an enqueue that returned
survives a power loss. ``normal``: in WAL mode a commit is not fsynced (the WAL is, at each
checkpoint); the database stays consistent and survives a crash of the process, but a power
loss or OS crash can lose the last commits, i.e. enqueues that already returned. Chosen per
URL: ``sqlite+aiosqlite:///commands.db?synchronous=normal``.
"""


COMMAND_TIMEOUT = 300.0
"""Seconds a PostgreSQL statement may take (asyncpg's ``command_timeout``) before its call
fails with ``StateError``.

A link that stalls without a reset (a dead peer, a hung proxy) would otherwise hold every
call on it for as long as TCP takes to give up (hours). Five minutes, since the same bound
holds for a schema upgrade of a large table, a start waiting for another process's upgrade
(under its advisory lock) and a cleanup pruning a large backlog in one statement; the URL sets
another (``?command_timeout=30``).
"""

CONNECT_TIMEOUT = 10.0
"""Seconds a new PostgreSQL connection may take to open (asyncpg's ``timeout``, 60 by
default) before its call fails with ``StateError``; the URL sets another (``?timeout=30``)."""


def create_engine(url: str, **engine_options: Any) -> AsyncEngine:
    """An AsyncEngine for the state index at ``url``, with the SQLite set-up when it is one.

    A SQLite URL may carry ``?synchronous=full|normal`` (see :data:`SYNCHRONOUS`); a
    PostgreSQL one ``?command_timeout=`` and ``?timeout=`` in seconds (see
    :data:`COMMAND_TIMEOUT`, :data:`CONNECT_TIMEOUT`).

    Raises:
        ValueError: an unknown ``synchronous`` level, or a timeout that is not a number.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        connect_args = engine_options.pop("connect_args", {})
        if parsed.get_driver_name() == "asyncpg":
            # Numbers here: asyncpg adds to a connect timeout given as the URL's string.
            bounds = {
                name: float(_option(parsed, name, default))
                for name, default in (
                    ("command_timeout", COMMAND_TIMEOUT),
                    ("timeout", CONNECT_TIMEOUT),
                )
            }
            parsed = parsed.difference_update_query(bounds)
            connect_args = {**bounds, **connect_args}
        return create_async_engine(parsed, connect_args=connect_args, **engine_options)
    synchronous = _option(parsed, "synchronous", SYNCHRONOUS[0]).lower()
    if synchronous not in SYNCHRONOUS:
        raise ValueError(f"synchronous={synchronous!r}: SQLite index accepts {SYNCHRONOUS}")
    connect_args = {"async_creator_fn": _open_aiosqlite, **engine_options.pop("connect_args", {})}
    engine = create_async_engine(
        parsed.difference_update_query(["synchronous"]),
        connect_args=connect_args,
        **engine_options,
    )
    configure_sqlite(engine, synchronous=synchronous)
    return engine


async def _open_aiosqlite(*args: Any, **kwargs: Any) -> aiosqlite.Connection:
    """What SQLAlchemy's aiosqlite dialect opens, but a failed open ends its worker thread
    before it raises.

    aiosqlite stops the thread of a connection that failed to open without waiting for it,
    and the thread then answers on the caller's event loop: a CLI that reports the error and
    exits closes that loop first, and the thread's "Event loop is closed" traceback lands
    under the one-line error (omnilib/aiosqlite#241).
    """
    connection = aiosqlite.connect(*args, **kwargs)
    # Before aiosqlite 0.22 the connection was the thread itself (the dialect checks too).
    thread = connection if isinstance(connection, Thread) else connection._thread
    # As the dialect does for its own: a thread left running must not keep a process alive.
    thread.daemon = True
    try:
        return await connection
    except Exception:
        await asyncio.to_thread(thread.join)
        raise


# The pragmas each configured engine's connections run, for connections opened beside it.
_pragmas: weakref.WeakKeyDictionary[sa.Engine, tuple[str, ...]] = weakref.WeakKeyDictionary()


def sqlite_pragmas(engine: AsyncEngine) -> tuple[str, ...]:
    """The pragmas for a connection to ``engine``'s file opened outside its pool: those
    every connection of the engine runs when it opens (see :func:`configure_sqlite`).

    For an engine not configured here (a caller's, which the store leaves as it is) the
    per-connection ones only: ``journal_mode`` persists in the file, which is the caller's.
    """
    configured = _pragmas.get(engine.sync_engine)
    if configured is not None:
        return configured
    return (
        *(pragma for pragma in _SQLITE_PRAGMAS if not pragma.startswith("PRAGMA journal_mode")),
        f"PRAGMA synchronous={SYNCHRONOUS[0].upper()}",
    )


def configure_sqlite(engine: AsyncEngine, *, synchronous: str = SYNCHRONOUS[0]) -> None:
    """Applies the pragmas and makes write transactions take the write lock up front.

    Only the first call for an engine counts (:func:`create_engine` makes it).

    SQLite's default deferred BEGIN takes the write lock at the first write; if another
    connection committed in between, a WAL reader cannot upgrade and fails with SQLITE_BUSY
    without waiting. ``BEGIN IMMEDIATE`` takes the lock first, so concurrent writers queue on
    ``busy_timeout`` and each read-then-write (confirm, cancel, replace) is serialised.
    """
    sync_engine = engine.sync_engine
    if sync_engine in _pragmas:
        return
    pragmas = (*_SQLITE_PRAGMAS, f"PRAGMA synchronous={synchronous.upper()}")
    _pragmas[sync_engine] = pragmas

    @sa.event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us emit BEGIN ourselves (the driver's implicit BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @sa.event.listens_for(sync_engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _option(url: sa.URL, name: str, default: object) -> str:
    """The URL's one value of the query option ``name`` (``default`` when it has none)."""
    value = url.query.get(name, default)
    if isinstance(value, tuple):  # given twice: the URL holds both
        raise ValueError(f"{name} is given more than once in the state URL")
    return str(value)


def driver_reason(exc: BaseException) -> str:
    """What the driver said, without SQLAlchemy's statement and link to its error pages (the
    exception chained to the :class:`StateError` keeps both)."""
    driver_error = getattr(exc, "orig", None)
    error = driver_error if driver_error is not None else exc
    if isinstance(error, _BROKEN_MID_CALL):
        # Its words name the protocol's states ("cannot switch to state 15; another
        # operation (2) is in progress"), not that the server went during a call.
        return f"the connection to the database broke during the call ({error})"
    return str(error)


def take_write_lock(connection: sa.Connection) -> None:
    """Starts the SQLite transaction with ``BEGIN IMMEDIATE`` unless the engine's own
    ``begin`` listener already began one (:func:`amqp_queue.state.sql.engine.configure_sqlite`).

    On an engine without it the driver begins a transaction only before a write, so a read
    and the write it decides (cancel, confirm, a replacement) would not be atomic. Should a
    caller's engine begin deferred transactions itself, the store's run in them: SQLite then
    refuses a write after a stale read ("database is locked"), never makes it.
    """
    driver = connection.connection.driver_connection
    if driver is None or not driver.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
