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

A drain's claim (UPDATE ... RETURNING, which claims commands until ``claimed_until``) has
the same doubt, and worse: "not claimed" makes the drain requeue messages the next reader
drops while the claim holds them, commands delivered to nobody
(tests/test_sql_claim_doubt.py). Its rows come back before the COMMIT, each with ``xmin``,
the id of the transaction that wrote it: once the server process is gone, a row that still
has that id and that claim shows the claim committed, and the claim returns its records;
every row still open and not under that claim shows it did not, and the original StateError
stands; else (rows changed since, or no answer within the bound)
:class:`~amqp_queue.state.errors.ClaimOutcomeUnknown`, which carries the records: the drain
hands over what its claim did take (the hand-over leaves the rest alone) and leaves their
messages queued, for the next drain to drop or hand out.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import write_doubt
from ..errors import ClaimOutcomeUnknown, StateError
from ..model import CommandRecord
from ..write_doubt import BOUND
from . import postgres_reads
from . import statements as sql
from .engine import driver_reason
from .schema import command_queue
from .transactions import Row

logger = logging.getLogger("amqp_queue.state.sql")

T = TypeVar("T")
Answer = TypeVar("Answer")

_CONNECTION_LEVEL = ("08", "57P")
"""SQLSTATE prefixes that say the connection or the server went, not that a statement failed."""

_BACKEND_GONE = sa.text("SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = :pid)")
_SLICE = 5_000
"""Ids in one IN list, well under asyncpg's parameter limit."""


class _StillRunning(Exception):
    """The server process of the failed transaction still runs: its COMMIT may yet land."""


@dataclass
class Commit(Generic[T]):
    """The COMMIT of one write transaction: whether it was sent, by which server process,
    and what the transaction returned before it."""

    backend: int | None = None
    """The server's process id of the transaction's connection once its COMMIT is under
    way (0 when the driver does not say); None before."""
    result: T | None = None
    """What the transaction returned, once its COMMIT is under way."""

    async def sending(self, conn: AsyncConnection, result: T) -> None:
        """Records that ``conn``'s transaction, which returned ``result``, is about to commit
        (no round trip)."""
        raw = await conn.get_raw_connection()
        self.backend = _server_pid(raw.driver_connection)
        self.result = result

    def sending_on(self, backend: int, result: T) -> None:
        """Records that the transaction of server process ``backend``, which returned
        ``result``, is about to commit (a transaction on the driver)."""
        self.backend, self.result = backend, result

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
            found = await _asking(engine, self.backend, functools.partial(_count_held, command_ids))
        except _Unknown as why:
            raise write_doubt.unknown(failure, why) from failure
        write_doubt.settle(failure, found, len(command_ids), logger)

    async def rerun(
        self, engine: AsyncEngine, failure: StateError, again: Callable[[], Awaitable[T]]
    ) -> T:
        """For a write that can run again whose COMMIT lost its answer (a change of one
        command, which recognises its own earlier write: ``indexed_store._OwnWriteAware``; a
        rollout's or device's set-wide change, which finds done what the lost run did): once
        the server process that ran it has ended (its outcome is final), runs it ``again``,
        retrying with jitter while the server is away: each for :data:`BOUND` seconds at
        most.

        Raises:
            StateError: ``failure`` if it failed before its COMMIT or with an error the
                server reported; one saying the outcome is unknown if the process was not
                seen to end, or no rerun got through, within the bound.
        """
        if self.backend is None or not connection_level(failure):
            raise failure
        logger.warning("%s; running the change again to find out", failure)
        try:
            await _asking(engine, self.backend, _nothing)
            return await write_doubt.within_bound(again, (StateError,))
        except _Unknown as why:
            raise write_doubt.unknown(failure, why) from failure
        except (TimeoutError, StateError) as exc:
            raise write_doubt.unknown(failure, exc) from failure

    async def settle_claim(
        self,
        engine: AsyncEngine,
        records: Sequence[CommandRecord],
        xmin: object,
        failure: StateError,
    ) -> None:
        """Returns if the failed claim of ``records`` by transaction ``xmin`` was committed
        after all: one of the rows still has that writer (and is claimed by it).

        Raises:
            StateError: ``failure`` if it was not: none has, and every one is still open (or
                it failed before its COMMIT, or with an error the server reported).
            ClaimOutcomeUnknown: none has, yet some are no longer open (another transaction
                changed them since, after this claim or in its stead), or it cannot be told
                within :data:`BOUND` seconds.
        """
        if self.backend is None or not connection_level(failure) or not records:
            raise failure
        ids = [record.id for record in records]
        try:
            rows = await _asking(engine, self.backend, functools.partial(_writers, ids))
        except _Unknown as why:
            raise ClaimOutcomeUnknown(
                f"{failure}; the claim's outcome is unknown, its commands may be delivered "
                f"(the index could not tell within {BOUND:g} s: {why})",
                records,
            ) from failure
        claimed_until = records[0].claimed_until
        if any(
            row["claimed_until"] == claimed_until and str(row["xmin"]) == str(xmin) for row in rows
        ):
            logger.warning("state index claim committed though its answer was lost: %s", failure)
            return
        if len(rows) == len(ids) and not any(
            row["delivered"] or row["end_reason"] or row["claimed_until"] == claimed_until
            for row in rows
        ):
            raise failure
        raise ClaimOutcomeUnknown(
            f"{failure}; the claim's outcome is unknown: none of its {len(ids)} commands "
            "shows it, yet some were changed since",
            records,
        ) from failure


async def _nothing(_: AsyncConnection) -> None:
    """No question: :func:`_asking` only waits for the transaction's process to end."""


class _Unknown(Exception):
    """What the index could not answer within :data:`BOUND` seconds, and why."""


async def _asking(
    engine: AsyncEngine,
    backend: int,
    question: Callable[[AsyncConnection], Awaitable[Answer]],
) -> Answer:
    """``question``, asked on a fresh connection in autocommit once ``backend`` has ended,
    retrying with jitter for at most :data:`BOUND` seconds.

    Raises:
        _Unknown: no answer within the bound.
    """

    async def ask() -> Answer:
        async with engine.connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            if backend and not await auto.scalar(_BACKEND_GONE, {"pid": backend}):
                raise _StillRunning("the transaction's server process still runs")
            return await question(auto)

    try:
        return await write_doubt.within_bound(ask, (SQLAlchemyError, OSError, _StillRunning))
    except (TimeoutError, SQLAlchemyError, OSError, _StillRunning) as exc:
        raise _Unknown(driver_reason(exc) or "timed out") from exc


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
        # A driver's own error, where the store ran the transaction on it directly: asyncpg's
        # server errors carry a SQLSTATE; its InterfaceError (a connection gone) carries none.
        if isinstance(cause, postgres_reads.FAILURES):
            code = getattr(cause, "sqlstate", None)
            return not isinstance(code, str) or code.startswith(_CONNECTION_LEVEL)
        cause = cause.__cause__
    return False


async def _count_held(command_ids: Sequence[str], auto: AsyncConnection) -> int:
    """How many of ``command_ids`` are in the table."""
    c = command_queue.c
    found = 0
    for start in range(0, len(command_ids), _SLICE):
        ids = list(command_ids[start : start + _SLICE])
        held = sa.select(sa.func.count()).select_from(command_queue).where(c.id.in_(ids))
        found += int(await auto.scalar(held) or 0)
    return found


async def _writers(command_ids: Sequence[str], auto: AsyncConnection) -> list[Row]:
    """Of ``command_ids``, each one's state and the transaction that last wrote it."""
    rows: list[Row] = []
    for start in range(0, len(command_ids), _SLICE):
        ids = list(command_ids[start : start + _SLICE])
        rows.extend(dict(row._mapping) for row in await auto.execute(sql.WRITERS, {"ids": ids}))
    return rows


def _server_pid(driver_connection: Any) -> int:
    get_server_pid = getattr(driver_connection, "get_server_pid", None)  # asyncpg
    if get_server_pid is not None:
        return int(get_server_pid())
    info = getattr(driver_connection, "info", None)  # psycopg 3
    return int(getattr(info, "backend_pid", 0) or 0)
