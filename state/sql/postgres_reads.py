"""What ``consume`` asks of the index for every window and hand-out, straight on asyncpg.

Through SQLAlchemy one autocommit read costs about 1.7 ms here where asyncpg itself answers
in a tenth of a millisecond (the adapter's bookkeeping around each statement), and
``consume`` asks before every hand-out whether the next command is still deliverable: on
PostgreSQL state that lookup was most of a stream's time. :class:`PostgresReads` runs the
same constructs (:mod:`amqp_queue.state.sql.statements`, compiled by
:mod:`amqp_queue.state.sql.compiled`) on the asyncpg connection under a pooled one, outside
any transaction: one statement is a consistent snapshot by itself.

Checking a pooled connection out and in again (two hops into SQLAlchemy's greenlet, the
pool's events and its reset) cost twice what the lookup itself does, so each kind of call
keeps one pooled connection checked out between calls
(:class:`~amqp_queue.state.sql.kept_connection.KeptCalls`): the liveness
lookups one, the delivery marks another, since a stream's marks commit in the background
while it looks up the next command. A call that finds its kept connection busy (another
stream's) takes one from the pool as before, never waits for it.

The delivery mark is one ``UPDATE`` in autocommit: a transaction by itself, as atomic as
``BEGIN``, the statement and ``COMMIT``, in one round trip instead of three.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import statements as sql
from .compiled import DriverSql
from .kept_connection import KeptCalls
from .statements import Statement

FAILURES: tuple[type[Exception], ...]
"""What a call raises when the database or the connection to it fails."""
try:
    import asyncpg
except ImportError:  # the postgres extra is not installed: no asyncpg call can fail
    FAILURES = (SQLAlchemyError, OSError)
else:
    # InternalClientError: the server went in the middle of an operation (no InterfaceError).
    FAILURES = (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        SQLAlchemyError,
        OSError,
    )


def usable(engine: AsyncEngine) -> bool:
    """Whether ``engine`` reaches PostgreSQL through asyncpg."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg"


class PostgresReads:
    """``deliverable``, the one-command liveness check, a device's open commands and the
    delivery mark, each one round trip."""

    def __init__(self, engine: AsyncEngine, schema: str | None) -> None:
        self._engine = engine
        self._sql = DriverSql(engine.dialect, schema)
        self._reads = KeptCalls(engine, FAILURES)
        self._marks = KeptCalls(engine, FAILURES)

    async def deliverable(self, command_ids: Sequence[str], now: datetime) -> list[dict[str, Any]]:
        """Rows (column name to value) of the open, ready and unexpired commands among these."""
        return await self._fetch(sql.DELIVERABLE, {"ids": list(command_ids), "now": now})

    async def is_live(self, command_id: str, now: datetime) -> bool:
        """Whether the command is open, ready and unexpired."""
        return bool(await self._fetch(sql.LIVE, {"command_id": command_id, "now": now}))

    async def one(self, command_id: str) -> list[dict[str, Any]]:
        """The command's row, whatever its status (``sql.ONE``), if the index holds it."""
        return await self._fetch(sql.ONE, {"command_id": command_id})

    async def open_commands(self, device_id: str, now: datetime) -> list[dict[str, Any]]:
        """Rows of the device's open, unexpired commands in write order (``get_pending``)."""
        return await self._fetch(sql.OPEN_COMMANDS, {"device": device_id, "now": now})

    async def mark_delivered(self, command_ids: Sequence[str], now: datetime) -> int:
        """Marks these commands delivered (``MARK_DELIVERED``); returns how many it marked."""
        compiled, params = self._sql.prepare(
            sql.MARK_DELIVERED, {"ids": list(command_ids), "now": now}
        )

        async def execute(driver: Any) -> str:
            return str(await driver.execute(compiled.sql, *params))

        status = await self._marks.call(execute)
        # The command tag: "UPDATE <rows>".
        return int(status.rsplit(" ", 1)[-1])

    async def close(self) -> None:
        await self._reads.close()
        await self._marks.close()

    async def _fetch(self, statement: Statement, values: dict[str, Any]) -> list[dict[str, Any]]:
        compiled, params = self._sql.prepare(statement, values)

        async def fetch(driver: Any) -> Any:
            return await driver.fetch(compiled.sql, *params)

        # A read runs again on another connection should its own have died idle.
        return compiled.rows(await self._reads.call(fetch, rerun=True))
