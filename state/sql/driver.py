"""The hot writes on a SQLite file in three round trips to the driver's thread instead of eight.

aiosqlite runs every call in a thread of its own; through SQLAlchemy one write transaction
(``BEGIN IMMEDIATE``, an insert, ``COMMIT``) costs eight hops to that thread and back (a cursor
opened and closed per statement, the pool's reset on return), which at a few hundred
microseconds each weighs more than the commit's fsync. The plain inserts of ``enqueue`` and
the publish and delivery marks run here instead, on one connection this store keeps checked
out: ``BEGIN IMMEDIATE``, one ``executemany``, ``COMMIT``. The SQL is compiled by SQLAlchemy
from the same table and predicates, and every value goes through the column type's own bind
processor, so rows are stored exactly as the SQLAlchemy path stores them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import SingletonThreadPool, StaticPool
from sqlalchemy.sql.compiler import SQLCompiler

from state.sql.schema import IS_OPEN, command_queue

c = command_queue.c

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
        and database not in ("", ":memory:")
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

    def params(self, values: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(
            value if process is None else process(value)
            for value, process in zip(
                (values[name] for name in self._names), self._processors, strict=True
            )
        )


class SqliteWriter:
    """Inserts and marks on a dedicated connection; the caller serialises the calls."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
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
        self._connection: AsyncConnection | None = None
        self._driver: Any = None

    async def write(
        self, rows: Sequence[dict[str, Any]], published: Collection[str], at: datetime
    ) -> None:
        """Inserts rows (``command_queue`` columns but ``seq``) and marks commands published
        ``at``, in one transaction."""
        steps = []
        if rows:
            steps.append((self._insert.sql, [self._insert.params(row) for row in rows]))
        if published:
            steps.append(self._marks(self._published, published, at))
        await self._run(steps)

    async def mark_delivered(self, command_ids: Collection[str], at: datetime) -> int:
        return await self._run([self._marks(self._delivered, command_ids, at)])

    async def close(self) -> None:
        """Returns the dedicated connection to the pool."""
        connection, self._connection, self._driver = self._connection, None, None
        if connection is not None:
            await connection.close()

    @staticmethod
    def _marks(
        statement: _Statement, command_ids: Collection[str], at: datetime
    ) -> tuple[str, list[tuple[Any, ...]]]:
        return statement.sql, [
            statement.params({"command_id": each, "at": at}) for each in command_ids
        ]

    async def _run(self, steps: list[tuple[str, list[tuple[Any, ...]]]]) -> int:
        """Runs each statement over its rows in one transaction; returns the rows changed."""
        if not steps:
            return 0
        driver = await self._checkout()
        changed = 0
        try:
            # execute_fetchall: the BEGIN's cursor never leaves the driver's thread.
            await driver.execute_fetchall("BEGIN IMMEDIATE")
            for sql, rows in steps:
                cursor = await driver.executemany(sql, rows)
                changed += cursor.rowcount
            await driver.commit()
        except BaseException:
            # Whatever state the connection is in, it is not reused.
            await self._discard()
            raise
        return changed

    async def _checkout(self) -> Any:
        if self._driver is None:
            connection = await self._engine.connect()
            try:
                raw = await connection.get_raw_connection()
            except BaseException:
                await connection.close()
                raise
            self._connection, self._driver = connection, raw.driver_connection
        return self._driver

    async def _discard(self) -> None:
        connection, self._connection, self._driver = self._connection, None, None
        if connection is not None:
            try:
                await connection.invalidate()
            finally:
                await connection.close()
