"""Where the SQL store's transactions and reads run: a connection of the engine, on a SQLite
file the writer thread for the hot paths, on PostgreSQL through asyncpg the driver connection
for every write transaction (:mod:`amqp_queue.state.sql.postgres_writes`); each failure raised
as a ``StateError``.

:class:`SqlExecution` is the half of :class:`~amqp_queue.state.sql.store.SqlStore` that
every call goes through; the store sets its connections up (``__init__``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..cancellation import LeftToFinish, finished, run_through
from ..errors import StateError
from . import commit_doubt, deadlock_retry, postgres_reads, sqlite_direct, transactions
from .engine import READ_ONLY, driver_reason, take_write_lock
from .postgres_writes import PostgresWrites
from .sqlite_writer import SqliteWriter
from .transactions import Transaction

T = TypeVar("T")
P = ParamSpec("P")

CUT_WRITE_WAIT = 10.0
"""Seconds a caller cut short waits at most for its PostgreSQL write to end (as long as a
SQLite write waits for the file's lock, ``busy_timeout``); past them the write is cancelled,
which rolls it back unless its COMMIT had landed, and the cut raised."""


class SqlExecution:
    """Runs the SQL store's transactions and reads (see the module)."""

    _engine: AsyncEngine
    _sqlite: bool
    # Orders this process's writers on SQLite (see SqlStore.__init__); a no-op elsewhere.
    _writers: AbstractAsyncContextManager[Any]
    # What reads wait for: the writers' turn on an in-memory database, else nothing.
    _readers: AbstractAsyncContextManager[Any]
    _writer: SqliteWriter | None
    # PostgreSQL through asyncpg: write transactions on the driver (None elsewhere).
    _pg_writes: PostgresWrites | None
    # Reads whose callers were cancelled, finishing by themselves before the store closes.
    _left: LeftToFinish

    async def _hot(
        self,
        what: str,
        transaction: Callable[P, Transaction[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Runs ``transaction(*args, **kwargs)`` of a hot path (enqueue, publish and delivery marks,
        confirm, cancel): on a SQLite file on the writer thread, in one hop; else as
        :meth:`_transaction`. A caller cancelled once it began waits for its end, then raises."""
        return await self._hot_run(what, False, functools.partial(transaction, *args, **kwargs))

    async def _hot_through(
        self,
        what: str,
        transaction: Callable[P, Transaction[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """:meth:`_hot`, where a caller cancelled once the transaction began waits for its end
        and gets its answer, the call having completed (a drain: what it took is delivered,
        and nothing is given back that other calls may have taken as delivered meanwhile).
        Cut while it waits its turn, it never runs."""
        return await self._hot_run(what, True, functools.partial(transaction, *args, **kwargs))

    async def _hot_run(
        self, what: str, through: bool, transaction: Callable[[], Transaction[T]]
    ) -> T:
        if self._writer is None:
            return await self._committed(transaction, through=through)
        try:
            async with self._writers:
                running = self._writer.run(transaction())
                if not through:
                    return await running  # cut once begun: raises once it ended
                answer, _ = await finished(running)
            return answer
        except (*sqlite_direct.FAILURES, SQLAlchemyError) as exc:
            raise StateError(f"state index {what} failed: {driver_reason(exc)}") from exc

    async def _transaction(
        self, transaction: Callable[P, Transaction[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Runs ``transaction(*args, **kwargs)`` in one write transaction (on asyncpg's driver
        connection, else a connection of the engine), built afresh and run again if
        PostgreSQL aborted it as a deadlock victim or a serialization failure (see
        :mod:`amqp_queue.state.sql.deadlock_retry`)."""
        return await self._committed(functools.partial(transaction, *args, **kwargs))

    async def _rerunnable(
        self, transaction: Callable[[], Transaction[T]], again: Callable[[], Transaction[T]]
    ) -> T:
        """:meth:`_transaction` for a write that can be run again with the same effect (a
        change of a command, which recognises its own earlier write; a rollout's or device's
        set-wide change, which finds done what an earlier run did): on PostgreSQL a COMMIT
        whose answer was lost is run again as ``again`` (which answers for both runs) once
        its server process ended, to find out
        (:meth:`~amqp_queue.state.sql.commit_doubt.Commit.rerun`)."""
        if self._engine.dialect.name != "postgresql":
            return await self._committed(transaction)
        commit: commit_doubt.Commit[T] = commit_doubt.Commit()
        try:
            return await self._committed(transaction, commit)
        except StateError as failure:
            return await commit.rerun(self._engine, failure, lambda: self._committed(again))

    async def _committed(
        self,
        transaction: Callable[[], Transaction[T]],
        commit: commit_doubt.Commit[T] | None = None,
        *,
        retry_also: frozenset[str] = frozenset(),
        through: bool = False,
    ) -> T:
        """:meth:`_transaction`; ``commit`` learns when its COMMIT is under way, and what
        the transaction returned; ``retry_also``: SQLSTATEs run again as well; ``through``:
        as :meth:`_hot_through`."""
        async for attempt in deadlock_retry.retrying(retry_also):
            with attempt:
                if commit is not None:
                    commit.backend, commit.result = None, None
                # From its BEGIN, run to its end through the caller's cancellation (see
                # run_through): a pooled SQLite connection left half way through a
                # transaction keeps the write lock, and asyncpg's cancel rolls a transaction
                # back (in its COMMIT too) and throws the connection away.
                if self._pg_writes is not None:
                    answer, cut = await finished(
                        self._on_driver(self._pg_writes, transaction(), commit), CUT_WRITE_WAIT
                    )
                    break
                async with self._writers:
                    # Cut while it waits its turn, it never runs.
                    answer, cut = await finished(self._on_engine(transaction(), commit))
                break
        else:
            raise AssertionError("unreachable: the last failure is re-raised")
        if cut and not through:
            # Raised here, outside the retries: a cancellation is not a failure to run again.
            raise asyncio.CancelledError
        return answer

    async def _on_engine(
        self, transaction: Transaction[T], commit: commit_doubt.Commit[T] | None
    ) -> T:
        async with self._begun() as conn:
            result = await transactions.run(conn, transaction)
            if commit is not None:
                await commit.sending(conn, result)
            return result

    async def _on_driver(
        self,
        writes: PostgresWrites,
        transaction: Transaction[T],
        commit: commit_doubt.Commit[T] | None,
    ) -> T:
        try:
            return await writes.run(transaction, commit)
        except postgres_reads.FAILURES as exc:
            raise StateError(f"state index write failed: {driver_reason(exc)}") from exc

    async def _select(self, query: sa.Select[Any], **params: Any) -> list[transactions.Row]:
        if self._engine.dialect.name == "postgresql":
            # One statement is a consistent snapshot by itself: in autocommit it costs one
            # round trip, where BEGIN, the query and COMMIT (and the pool's reset) cost
            # three or four: consume() asks this before every hand-out.
            return await self._left.run(self._autocommit_read(query, params))
        # Run to its end through the caller's cancellation: a read cut half way makes
        # SQLAlchemy throw its pooled connection away, and with it an in-memory database
        # (every table gone: tests/test_cancelled_reads.py).
        async with self._readers:
            return await run_through(self._read_rows(query, params))

    async def _autocommit_read(
        self, query: sa.Select[Any], params: dict[str, Any]
    ) -> list[transactions.Row]:
        for last in (False, True):
            try:
                async with self._engine.connect() as conn:
                    auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
                    return [dict(row._mapping) for row in await auto.execute(query, params)]
            except (SQLAlchemyError, OSError) as exc:
                # A pooled connection that died idle (the server restarted, the link was
                # cut): SQLAlchemy has dropped every connection pooled before it, and the
                # read runs again once on a new one.
                if not last and isinstance(exc, DBAPIError) and exc.connection_invalidated:
                    continue
                raise StateError(f"state index read failed: {driver_reason(exc)}") from exc
        raise AssertionError("unreachable: the last failure is raised")

    async def _read_rows(
        self, query: sa.Select[Any], params: dict[str, Any]
    ) -> list[transactions.Row]:
        async with self._read() as conn:
            return [dict(row._mapping) for row in await conn.execute(query, params)]

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self._writers, self._begun() as conn:
            yield conn

    @asynccontextmanager
    async def _begun(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction on a connection of the engine (the caller holds its turn)."""
        try:
            async with self._engine.begin() as conn:
                if self._sqlite:
                    await conn.run_sync(take_write_lock)
                yield conn
        except (SQLAlchemyError, OSError) as exc:
            raise StateError(f"state index write failed: {driver_reason(exc)}") from exc

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self._engine.connect() as conn:
                await conn.execution_options(**{READ_ONLY: True})
                async with conn.begin():
                    yield conn
        except (SQLAlchemyError, OSError) as exc:
            raise StateError(f"state index read failed: {driver_reason(exc)}") from exc
