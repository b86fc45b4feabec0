"""The reads ``consume`` makes of every window and hand-out, straight on asyncpg.

Through SQLAlchemy one autocommit read costs about 1.7 ms here where asyncpg itself answers
in a tenth of a millisecond (the adapter's bookkeeping around each statement), and
``consume`` asks before every hand-out whether the next command is still deliverable: on
PostgreSQL state that lookup was most of a stream's time. :class:`PostgresReads` runs the
same constructs (:mod:`amqp_queue.state.sql.statements`, compiled by
:mod:`amqp_queue.state.sql.compiled`) on the asyncpg connection under a pooled one, outside
any transaction: one statement is a consistent snapshot by itself. About 0.3 ms a read.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import statements as sql
from .compiled import DriverSql
from .statements import Statement

FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, SQLAlchemyError, OSError)
"""What a read raises when the database or the connection to it fails."""


def usable(engine: AsyncEngine) -> bool:
    """Whether ``engine`` reaches PostgreSQL through asyncpg."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg"


class PostgresReads:
    """``deliverable`` and the one-command liveness check, each one round trip."""

    def __init__(self, engine: AsyncEngine, schema: str | None) -> None:
        self._engine = engine
        self._sql = DriverSql(engine.dialect, schema)

    async def deliverable(self, command_ids: Sequence[str], now: datetime) -> list[dict[str, Any]]:
        """Rows (column name to value) of the open, ready and unexpired commands among these."""
        return await self._fetch(sql.DELIVERABLE, {"ids": list(command_ids), "now": now})

    async def is_live(self, command_id: str, now: datetime) -> bool:
        """Whether the command is open, ready and unexpired."""
        return bool(await self._fetch(sql.LIVE, {"command_id": command_id, "now": now}))

    async def _fetch(self, statement: Statement, values: dict[str, Any]) -> list[dict[str, Any]]:
        compiled, params = self._sql.prepare(statement, values)
        async with self._engine.connect() as conn:
            raw = await conn.get_raw_connection()
            try:
                driver: Any = raw.driver_connection
                fetched = await driver.fetch(compiled.sql, *params)
            except BaseException:
                # Whatever state a failed or interrupted call left it in is not reused.
                await conn.invalidate()
                raise
        return compiled.rows(fetched)
