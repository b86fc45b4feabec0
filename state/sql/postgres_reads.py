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
keeps one pooled connection checked out between calls (:class:`_Kept`): the liveness
lookups one, the delivery marks another, since a stream's marks commit in the background
while it looks up the next command. A call that finds its kept connection busy (another
stream's) takes one from the pool as before, never waits for it.

The delivery mark is one ``UPDATE`` in autocommit: a transaction by itself, as atomic as
``BEGIN``, the statement and ``COMMIT``, in one round trip instead of three.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from . import statements as sql
from .compiled import DriverSql
from .kept_connection import KeptConnection
from .statements import Statement

FAILURES: tuple[type[Exception], ...]
"""What a call raises when the database or the connection to it fails."""
try:
    import asyncpg
except ImportError:  # the postgres extra is not installed: no asyncpg call can fail
    FAILURES = (SQLAlchemyError, OSError)
else:
    FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, SQLAlchemyError, OSError)

T = TypeVar("T")

# Seconds a closing store waits for a call on a kept connection to finish before it hands
# the connection back regardless (the call then fails, as on any closed connection).
_CLOSE_WAIT = 5.0


def usable(engine: AsyncEngine) -> bool:
    """Whether ``engine`` reaches PostgreSQL through asyncpg."""
    return engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg"


class _Kept:
    """A :class:`KeptConnection` used by one call at a time (the caller checks ``busy``),
    handed back on close once the call running on it has finished."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._kept = KeptConnection(engine)
        self.busy = False
        self.closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self, call: Callable[[Any], Awaitable[T]]) -> T:
        """``call`` on the kept asyncpg connection."""
        self.busy = True
        self._idle.clear()
        try:
            driver = await self._kept.driver()
            try:
                return await call(driver)
            except BaseException:
                # Whatever state a failed or interrupted call left it in is not reused.
                await self._kept.discard()
                raise
        finally:
            self.busy = False
            self._idle.set()

    async def close(self) -> None:
        """Hands the connection back for good, once a call running on it has finished (at
        most ``_CLOSE_WAIT`` seconds): a stream outliving its store takes pooled
        connections of the engine, should it still be open, never keeps one again."""
        self.closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_WAIT):
                await self._idle.wait()
        await self._kept.close()


class PostgresReads:
    """``deliverable``, the one-command liveness check and the delivery mark, each one
    round trip."""

    def __init__(self, engine: AsyncEngine, schema: str | None) -> None:
        self._engine = engine
        self._sql = DriverSql(engine.dialect, schema)
        self._reads = _Kept(engine)
        self._marks = _Kept(engine)

    async def deliverable(self, command_ids: Sequence[str], now: datetime) -> list[dict[str, Any]]:
        """Rows (column name to value) of the open, ready and unexpired commands among these."""
        return await self._fetch(sql.DELIVERABLE, {"ids": list(command_ids), "now": now})

    async def is_live(self, command_id: str, now: datetime) -> bool:
        """Whether the command is open, ready and unexpired."""
        return bool(await self._fetch(sql.LIVE, {"command_id": command_id, "now": now}))

    async def mark_delivered(self, command_ids: Sequence[str], now: datetime) -> int:
        """Marks these commands delivered (``MARK_DELIVERED``); returns how many it marked."""
        compiled, params = self._sql.prepare(
            sql.MARK_DELIVERED, {"ids": list(command_ids), "now": now}
        )

        async def execute(driver: Any) -> str:
            return str(await driver.execute(compiled.sql, *params))

        status = await self._run(self._marks, execute)
        # The command tag: "UPDATE <rows>".
        return int(status.rsplit(" ", 1)[-1])

    async def close(self) -> None:
        await self._reads.close()
        await self._marks.close()

    async def _fetch(self, statement: Statement, values: dict[str, Any]) -> list[dict[str, Any]]:
        compiled, params = self._sql.prepare(statement, values)

        async def fetch(driver: Any) -> Any:
            return await driver.fetch(compiled.sql, *params)

        return compiled.rows(await self._run(self._reads, fetch))

    async def _run(self, kept: _Kept, call: Callable[[Any], Awaitable[T]]) -> T:
        if not kept.busy and not kept.closed:
            return await kept.run(call)
        async with self._engine.connect() as conn:
            raw = await conn.get_raw_connection()
            try:
                return await call(raw.driver_connection)
            except BaseException:
                await conn.invalidate()
                raise
