"""Whether a write whose COMMIT lost its answer was written, asked before answering.

A COMMIT can land on PostgreSQL while the client never hears it: the server stopped
(``pg_ctl stop -m immediate``) after the commit record reached the disk, or the connection
cut while the commit was in flight (the server finishes it all the same). The driver only
reports a lost connection. The store used to raise StateError, telling the caller nothing
was written, for commands the outbox relay then published and devices received
(tests/test_sql_commit_doubt.py). The promise is that an error means nothing was written,
wherever we can tell.

So when a write of new commands fails at its COMMIT with a connection-level error (no
SQLSTATE, or class 08 "connection exception", or 57P "operator intervention"; any other
error is the server reporting a failed statement, which rolled the transaction back), the
store asks, on a fresh connection, retrying with jitter for at most :data:`BOUND` seconds:

- first whether the server process that ran the transaction is gone (``pg_stat_activity``),
  so that its outcome is final (a cut commit may still be landing until then);
- then whether the batch's command ids are in the table: all of them, it was written and the
  call returns; none, it was not, and the original StateError stands;
- if it cannot tell within the bound, a StateError that says the outcome is unknown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from ..errors import StateError
from .engine import driver_reason
from .schema import command_queue

logger = logging.getLogger("amqp_queue.state.sql")

BOUND = 5.0
"""Seconds the store may spend finding out whether a write whose COMMIT failed landed."""

_CONNECTION_LEVEL = ("08", "57P")
"""SQLSTATE prefixes that say the connection or the server went, not that a statement failed."""

_BACKEND_GONE = sa.text("SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = :pid)")
_SLICE = 5_000
"""Ids in one IN list, well under asyncpg's parameter limit."""


class _StillRunning(Exception):
    """The server process of the failed transaction still runs: its COMMIT may yet land."""


@dataclass
class Commit:
    """The COMMIT of one write transaction: whether it was sent, and by which server process."""

    backend: int | None = None
    """The server's process id of the transaction's connection once its COMMIT is under
    way (0 when the driver does not say); None before."""

    async def sending(self, conn: AsyncConnection) -> None:
        """Records that ``conn``'s transaction is about to commit (no round trip)."""
        raw = await conn.get_raw_connection()
        self.backend = _server_pid(raw.driver_connection)

    async def settle(
        self, engine: AsyncEngine, command_ids: Sequence[str], failure: StateError
    ) -> None:
        """Returns if the failed write of ``command_ids`` was committed after all.

        Raises:
            StateError: ``failure`` if it was not (or it failed before its COMMIT, or with
                an error the server reported); one saying the outcome is unknown if that
                cannot be told within :data:`BOUND` seconds.
        """
        if self.backend is None or not connection_level(failure):
            raise failure
        try:
            async with asyncio.timeout(BOUND):
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type((SQLAlchemyError, OSError, _StillRunning)),
                    wait=wait_random_exponential(multiplier=0.05, max=0.5),
                    reraise=True,
                ):
                    with attempt:
                        found = await _count_held(engine, command_ids, self.backend)
        except (TimeoutError, SQLAlchemyError, OSError, _StillRunning) as exc:
            why = driver_reason(exc) or "timed out"
            raise StateError(
                f"{failure}; the write's outcome is unknown, its commands may have been "
                f"written (the index could not tell within {BOUND:g} s: {why})"
            ) from failure
        if found == len(command_ids):
            logger.warning("state index write committed though its answer was lost: %s", failure)
            return
        if found == 0:
            raise failure
        raise StateError(  # one transaction: never seen, said rather than hidden
            f"{failure}; the write's outcome is unknown: {found} of its "
            f"{len(command_ids)} commands are in the index"
        ) from failure


def connection_level(failure: BaseException) -> bool:
    """Whether ``failure`` (or what it wraps) is a lost connection or server, not an error
    the server reported for a statement (which rolled the transaction back)."""
    cause: BaseException | None = failure
    while cause is not None:
        if isinstance(cause, DBAPIError):
            code = getattr(cause.orig, "sqlstate", None) or getattr(cause.orig, "pgcode", None)
            return code is None or str(code).startswith(_CONNECTION_LEVEL)
        if isinstance(cause, OSError):
            return True
        cause = cause.__cause__
    return False


async def _count_held(engine: AsyncEngine, command_ids: Sequence[str], backend: int) -> int:
    """How many of ``command_ids`` are in the table, once ``backend`` has ended."""
    c = command_queue.c
    async with engine.connect() as conn:
        auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
        if backend and not await auto.scalar(_BACKEND_GONE, {"pid": backend}):
            raise _StillRunning("the transaction's server process still runs")
        found = 0
        for start in range(0, len(command_ids), _SLICE):
            ids = list(command_ids[start : start + _SLICE])
            held = sa.select(sa.func.count()).select_from(command_queue).where(c.id.in_(ids))
            found += int(await auto.scalar(held) or 0)
        return found


def _server_pid(driver_connection: Any) -> int:
    get_server_pid = getattr(driver_connection, "get_server_pid", None)  # asyncpg
    if get_server_pid is not None:
        return int(get_server_pid())
    info = getattr(driver_connection, "info", None)  # psycopg 3
    return int(getattr(info, "backend_pid", 0) or 0)
