"""The reads ``consume`` makes of every window and hand-out, straight on the SQLite driver.

- :class:`SqliteReader`: ``deliverable`` (what ``consume`` asks of each window), and a
  device's open commands (``get_pending``, the operators' list), each as one statement in
  autocommit mode, a consistent snapshot by itself (one hop), on a pooled
  connection the store keeps checked out.
- :class:`SqliteLiveCheck`: whether one command is still deliverable (what ``consume`` asks
  before each hand-out), and which of a few are (a window of a device online, one command
  at a time), read on the calling thread: a primary-key lookup in a WAL database takes
  about ten microseconds, a tenth of one hop to a driver thread.

Both execute the constructs of :mod:`amqp_queue.state.sql.statements` (see
:mod:`amqp_queue.state.sql.sqlite_direct`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from . import statements as sql
from .compiled import DriverSql
from .kept_connection import KeptConnection
from .sqlite_direct import SqliteFile
from .statements import Statement

FEW = 8
"""The most ids :meth:`SqliteLiveCheck.deliverable` reads on the event loop's thread: a
window of a device online holds one or a few, and blocking the loop for more would cost the
other streams more than the hop it saves."""


class SqliteReader:
    """``deliverable`` and a device's open commands, each in one statement and one hop;
    calls may run concurrently."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._sql = DriverSql(engine.dialect)
        self._connection = KeptConnection(engine)

    async def deliverable(self, command_ids: Sequence[str], now: datetime) -> list[dict[str, Any]]:
        """Rows (column name to value) of the open, ready and unexpired commands among these."""
        return await self._fetch(sql.DELIVERABLE, {"ids": list(command_ids), "now": now})

    async def open_commands(self, device_id: str, now: datetime) -> list[dict[str, Any]]:
        """Rows of the device's open, unexpired commands in write order (``get_pending``)."""
        return await self._fetch(sql.OPEN_COMMANDS, {"device": device_id, "now": now})

    async def _fetch(self, statement: Statement, values: dict[str, Any]) -> list[dict[str, Any]]:
        compiled, params = self._sql.prepare(statement, values)
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
        self._sql = DriverSql(engine.dialect)
        self._closed = False
        self._connection: sqlite3.Connection | None = None

    def is_live(self, command_id: str, now: datetime) -> bool | None:
        """True or False; None when it cannot answer without waiting (SQLite busy) or at
        all (closed): the caller then asks on a driver thread."""
        compiled, params = self._sql.prepare(sql.LIVE, {"command_id": command_id, "now": now})
        rows = self._fetch(compiled.sql, params)
        return None if rows is None else bool(rows)

    def one(self, command_id: str) -> list[dict[str, Any]] | None:
        """The command's row, whatever its status (``sql.ONE``); None as :meth:`is_live`."""
        compiled, params = self._sql.prepare(sql.ONE, {"command_id": command_id})
        rows = self._fetch(compiled.sql, params)
        return None if rows is None else compiled.rows(rows)

    def deliverable(self, command_ids: Sequence[str], now: datetime) -> list[dict[str, Any]] | None:
        """As :meth:`SqliteReader.deliverable`, for at most :data:`FEW` ids (a lookup each);
        None as :meth:`is_live`, or for more ids."""
        if len(command_ids) > FEW:
            return None
        values = {"ids": list(command_ids), "now": now}
        compiled, params = self._sql.prepare(sql.DELIVERABLE, values)
        rows = self._fetch(compiled.sql, params)
        return None if rows is None else compiled.rows(rows)

    def _fetch(self, statement: str, params: Any) -> list[Any] | None:
        if self._closed:
            return None
        if self._connection is None:
            # Autocommit: each lookup is its own snapshot and holds no read lock afterwards,
            # so it never keeps a checkpoint from finishing. Not waiting: busy means fall back.
            self._connection = self._file.connect(
                ("PRAGMA query_only=ON", "PRAGMA busy_timeout=0"),
                check_same_thread=False,
            )
        try:
            return self._connection.execute(statement, params).fetchall()
        except sqlite3.OperationalError as exc:
            # The primary code is the low byte (SQLITE_BUSY_RECOVERY is a kind of SQLITE_BUSY).
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return None
            self._drop()
            raise

    def close(self) -> None:
        """Closes the connection for good: a stream outliving its store never reopens it."""
        self._closed = True
        self._drop()

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
