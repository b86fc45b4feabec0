"""A pooled connection kept checked out between calls.

The reads and marks ``consume`` makes for every hand-out, and on PostgreSQL every write
transaction, run on the driver directly
(:mod:`amqp_queue.state.sql.sqlite_reads`, :mod:`amqp_queue.state.sql.postgres_reads`):
checking a pooled connection out and in again for each would cost more than the call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..cancellation import LeftToFinish

T = TypeVar("T")

# Seconds a closing store waits for a call on a kept connection to finish before it hands
# the connection back regardless (the call then fails, as on any closed connection).
CLOSE_WAIT = 5.0


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


class KeptCalls:
    """Calls on the driver connection of a :class:`KeptConnection`, one at a time: a call
    that finds it busy (another stream's, another write) takes a pooled connection for
    itself, never waits. After a call was interrupted, or failed with one of ``failures``
    that says the connection or the server went, its connection is not used again; after an
    error the server reported for a statement, or one of the caller's own (a refused change),
    the transaction rolled back and the connection is kept.
    """

    def __init__(self, engine: AsyncEngine, failures: tuple[type[Exception], ...]) -> None:
        self._engine = engine
        self._failures = failures
        self._kept = KeptConnection(engine)
        self._busy = False
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._left = LeftToFinish()

    async def call(self, call: Callable[[Any], Awaitable[T]], *, rerun: bool = False) -> T:
        """``call`` on the kept driver connection, or on a pooled one while that is busy.

        After a server restart or a cut link, the kept connection and every idle pooled one
        died unused. One the driver already knows is closed is dropped and another taken,
        nothing having been sent on it; with ``rerun`` (a read), so is one found dead by the
        call itself (not one that timed out). The budget: one more try than the connections
        idle in the pool when the first one failed (each is found dead at once). A read
        whose caller is cancelled finishes by itself on the kept connection (see
        :meth:`_on_kept`).
        """
        tries: int | None = None
        while True:
            try:
                return await self._call_once(call, finish_if_cut=rerun)
            except _LinkLost as lost:
                if tries is None:
                    tries = self._idle_pooled()
                if tries == 0 or not (lost.unsent or (rerun and lost.found_dead)):
                    raise lost.failure from None
                tries -= 1

    async def _call_once(self, call: Callable[[Any], Awaitable[T]], *, finish_if_cut: bool) -> T:
        if self._busy or self._closed:
            on_its_own = self._on_pooled(call)
        else:
            self._busy = True
            self._idle.clear()
            on_its_own = self._on_kept(call)
        if not finish_if_cut:
            return await on_its_own
        # A gateway polling consume() with a short deadline opened a new connection to
        # PostgreSQL at nearly every poll, each cut read spoiling its own.
        return await self._left.run(on_its_own)

    async def _on_pooled(self, call: Callable[[Any], Awaitable[T]]) -> T:
        async with self._engine.connect() as conn:
            raw = await conn.get_raw_connection()
            try:
                return await call(_open(raw.driver_connection))
            except BaseException as exc:
                if self._spoilt_by(exc):
                    await conn.invalidate()
                    _raise_lost(exc)
                raise

    async def _on_kept(self, call: Callable[[Any], Awaitable[T]]) -> T:
        """``call`` on the kept connection, which is busy until it ends (meanwhile other
        calls take pooled connections)."""
        try:
            driver = await self._kept.driver()
            try:
                return await call(_open(driver))
            except BaseException as exc:
                if self._spoilt_by(exc):
                    await self._kept.discard()
                    _raise_lost(exc)
                raise
        finally:
            self._busy = False
            self._idle.set()

    def _idle_pooled(self) -> int:
        checked_in = getattr(self._engine.pool, "checkedin", None)
        return int(checked_in()) + 1 if callable(checked_in) else 1

    async def close(self) -> None:
        """Hands the connection back for good, once a call running on it has finished (at
        most ``CLOSE_WAIT`` seconds): a stream outliving its store takes pooled
        connections of the engine, should it still be open, never keeps one again."""
        self._closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT):
                await self._idle.wait()
        await self._left.wait()  # reads their callers left, on it or pooled
        if self._busy:
            # Still in a call (a transaction, maybe): never handed to another pool user.
            await self._kept.discard()
        else:
            await self._kept.close()

    def _spoilt_by(self, exc: BaseException) -> bool:
        if not isinstance(exc, Exception):
            return True
        # An error the server reported for a statement (a deadlock victim, a unique
        # violation) leaves the connection sound, its transaction rolled back; one that says
        # the connection or the server went (08, 57P) does not.
        code = getattr(exc, "sqlstate", None)
        if isinstance(code, str):
            return code.startswith(("08", "57P"))
        return isinstance(exc, self._failures)


class _Unsent(ConnectionError):
    """The driver knew its connection closed before the call: nothing was sent on it."""


class _LinkLost(Exception):
    """A call failed because its connection (or the server) went: ``failure`` says how."""

    def __init__(self, failure: Exception) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.unsent = isinstance(failure, _Unsent)
        # Not a link that stalled (it timed out): another through it would stall as long.
        self.found_dead = not isinstance(failure, TimeoutError)


def _open(driver: Any) -> Any:
    """``driver``, unless it knows its connection closed (asyncpg's, after the server or
    the link went while it sat idle)."""
    is_closed = getattr(driver, "is_closed", None)
    if callable(is_closed) and is_closed():
        raise _Unsent("the connection to the index is closed")
    return driver


def _raise_lost(exc: BaseException) -> None:
    """Raises :class:`_LinkLost` for a failure of the link (a cancellation stays itself)."""
    if isinstance(exc, Exception):
        raise _LinkLost(exc) from exc
