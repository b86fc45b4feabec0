"""The index's statements straight on the sqlite3 driver, beside a SQLite engine.

aiosqlite runs every call in a thread of its own; through SQLAlchemy one write transaction
(``BEGIN IMMEDIATE``, an insert, ``COMMIT``) costs eight hops to that thread and back (a cursor
opened and closed per statement, the pool's reset on return), a one-statement read about
six, and at a hundred or more microseconds each they weigh more than the commit's fsync.
So on a SQLite file the store also runs its statements on driver connections of its own
(:mod:`amqp_queue.state.sql.sqlite_writer`, :mod:`amqp_queue.state.sql.sqlite_reads`).

They are the same constructs (:mod:`amqp_queue.state.sql.statements`), compiled for the
driver by :mod:`amqp_queue.state.sql.compiled`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import SingletonThreadPool, StaticPool

FAILURES = (sqlite3.Error, OSError)
"""What the driver raises when the database fails."""


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
        and not one_connection(engine)
    )


def one_connection(engine: AsyncEngine) -> bool:
    """Whether ``engine``'s pool hands one connection to every checkout (an in-memory
    database lives in it)."""
    return isinstance(engine.sync_engine.pool, StaticPool | SingletonThreadPool)


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
