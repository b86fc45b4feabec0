"""A pooled connection kept checked out between calls.

The reads and marks ``consume`` makes for every hand-out run on the driver directly
(:mod:`amqp_queue.state.sql.sqlite_reads`, :mod:`amqp_queue.state.sql.postgres_reads`):
checking a pooled connection out and in again for each would cost more than the call.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


class KeptConnection:
    """One pooled connection kept checked out; handed back on close or after a failure."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._connection: AsyncConnection | None = None
        self._driver: Any = None
        self._opening = asyncio.Lock()

    async def driver(self) -> Any:
        """The driver connection under it (aiosqlite's or asyncpg's)."""
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
