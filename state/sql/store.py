"""SqlStore: the state index on SQLAlchemy 2 async, SQLite or PostgreSQL from one code path.

Each operation's SQL is written once (:mod:`amqp_queue.state.sql.statements`) and each write
is one transaction written once (:mod:`amqp_queue.state.sql.transactions`); the store only
picks where it runs: a connection of the engine, or on a SQLite file the writer thread for
the hot paths (:mod:`amqp_queue.state.sql.sqlite_writer`).

Concurrency is enforced by the database, never by a process-local lock (on SQLite one
orders this store's own writers, only to spare them SQLite's sleeping busy handler):

- PostgreSQL: drains claim rows with ``UPDATE ... WHERE seq IN (SELECT ... ORDER BY seq FOR
  UPDATE) RETURNING``, waiting for rows another transaction holds; confirm and cancel lock
  their row with ``SELECT ... FOR UPDATE``;
  a replacement that races another insert of the same type meets the partial unique index,
  inserts nothing (``ON CONFLICT DO NOTHING``) and supersedes the winner on its next turn;
  a transaction aborted as a deadlock victim runs again
  (:mod:`amqp_queue.state.sql.deadlock_retry`).
- SQLite: every write transaction of the store starts with ``BEGIN IMMEDIATE`` (see
  :func:`amqp_queue.state.sql.engine.configure_sqlite` for why), so writers are serialised across
  connections and processes; the same statements then run unchanged. On an engine the store
  made, the engine's ``begin`` listener emits it; on a caller's engine, which the store leaves
  as it is, the store emits it in its own write transactions only.

Every per-device query filters on ``device_id`` and the open-command predicate, which the
partial index ``ix_command_queue_device_open`` covers. On SQLite ``EXPLAIN QUERY PLAN`` for
``get_pending`` reads ``SEARCH command_queue USING INDEX ix_command_queue_device_open
(device_id=?)`` (asserted in tests/test_sql_store.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ..cancellation import LeftToFinish
from ..clock import Clock, advancing, utc_now
from ..errors import StateError
from ..indexed_store import DEFAULT_RETENTION, Change, IndexedStore
from ..model import CommandRecord, CommandStatus
from ..validation import DEFAULT_LIMITS, Limits
from . import (
    commit_doubt,
    deadlock_retry,
    owners,
    postgres_reads,
    schema_versions,
    sqlite_direct,
    transactions,
)
from . import fleet_statements as fleet_sql
from . import statements as sql
from .delivery_calls import SqlDeliveryCalls
from .engine import create_engine, driver_reason
from .fleet_writes import SqlFleetWrites
from .lists import SqlLists
from .postgres_reads import PostgresReads
from .postgres_writes import PostgresWrites
from .schema_versions import SchemaChange
from .sqlite_reads import SqliteLiveCheck, SqliteReader
from .sqlite_writer import SqliteWriter

logger = logging.getLogger("amqp_queue.state.sql")


class SqlStore(SqlDeliveryCalls, SqlLists, SqlFleetWrites, IndexedStore):
    """The command store on a SQL database through SQLAlchemy 2 async.

    Args:
        engine: an AsyncEngine for SQLite (aiosqlite) or PostgreSQL (asyncpg). The caller
            keeps ownership; ``close()`` leaves it open, and :meth:`create_table` (which
            creates or upgrades the tables) is the caller's to call. Use :meth:`connect` to
            have the store create and own it.
        schema: the database schema holding ``command_queue`` (PostgreSQL), None for the
            default.
        limits, clock, retention: see :class:`amqp_queue.state.indexed_store.IndexedStore`.

    On a SQLite file (no ``schema``) the hot paths open connections of their own to the same
    file, with the pragmas the engine's connections run (see
    :mod:`amqp_queue.state.sql.sqlite_direct`);
    ``connect_args`` and ``connect`` listeners of your own do not reach them.

    A SQLite engine of yours is left as it is: no listeners, no pragmas on its connections,
    its transactions begin as its driver begins them, and the file keeps its journal mode
    (:func:`amqp_queue.state.sql.create_engine` makes one tuned for the index: WAL, so readers never
    wait for the writer). The store's own write transactions take the write lock up front
    (``BEGIN IMMEDIATE``) all the same.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        schema: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        clock: Clock = utc_now,
        retention: timedelta = DEFAULT_RETENTION,
    ) -> None:
        super().__init__(limits=limits, clock=clock, retention=retention)
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {engine.dialect.name!r}")
        self._sqlite = engine.dialect.name == "sqlite"
        if schema is not None:
            engine = engine.execution_options(schema_translate_map={None: schema})
        self._engine = engine
        self._schema = schema
        self._owns_engine = False
        # SQLite has one writer at a time. Two of this process's transactions racing for the
        # lock would meet SQLite's busy handler, which sleeps in steps of milliseconds; queued
        # here they wait only for the commit before them. Correctness still comes from
        # BEGIN IMMEDIATE (other processes, other stores on the same file).
        self._writers: AbstractAsyncContextManager[Any] = (
            asyncio.Lock() if self._sqlite else contextlib.nullcontext()
        )
        # An in-memory database lives in the one connection its pool hands to every
        # checkout: a read beside a write would run inside the write's transaction ("cannot
        # start a transaction within a transaction", an enqueue that returned lost with
        # the write it joined). There reads take their turns with the writes.
        shared = self._sqlite and sqlite_direct.one_connection(engine)
        self._readers = self._writers if shared else contextlib.nullcontext()
        # On a SQLite file the hot paths run on driver connections of their own
        # (sqlite_direct). Their SQL names the table without a schema, and their
        # connections run no ATTACH: with a schema, every statement goes through SQLAlchemy.
        direct = schema is None and sqlite_direct.usable(engine)
        self._writer = SqliteWriter(engine) if direct else None
        self._reader = SqliteReader(engine) if direct else None
        self._live_check = SqliteLiveCheck(engine) if direct else None
        on_asyncpg = postgres_reads.usable(engine)
        self._left = LeftToFinish()
        self._pg_reads = PostgresReads(engine, schema) if on_asyncpg else None
        self._pg_writes = PostgresWrites(engine, schema) if on_asyncpg else None

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        schema: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        clock: Clock = utc_now,
        retention: timedelta = DEFAULT_RETENTION,
        **engine_options: Any,
    ) -> SqlStore:
        """Opens the database at ``url``; creates or upgrades its tables (:meth:`create_table`).

        Raises:
            StateError: the database cannot be reached, the tables cannot be created or
                upgraded, or a newer release upgraded them beyond what this one knows.
        """
        engine = create_engine(url, **engine_options)
        try:
            # Apart from what follows: a database that is missing or refuses us is not a
            # failed write of the schema, whatever the caller came to do.
            async with engine.connect():
                pass
            # Closed at once: left in the pool, the probe's SQLite connection was later
            # collected unclosed (a ResourceWarning, tests/test_sql_store.py).
            await engine.dispose()
        except (SQLAlchemyError, OSError) as exc:
            await engine.dispose()
            where = engine.url.render_as_string(hide_password=True)
            raise StateError(
                f"cannot open the state index at {where}: {driver_reason(exc)}"
            ) from exc
        store = cls(engine, schema=schema, limits=limits, clock=clock, retention=retention)
        store._owns_engine = True
        try:
            await store.create_table()
        except BaseException:
            await engine.dispose()
            raise
        return store

    async def create_table(self) -> SchemaChange:
        """Creates the index's tables, or brings them to this release's schema.

        An empty database gets the tables; one an earlier release made (schema versions
        or not) is upgraded in place, automatically: see
        :mod:`amqp_queue.state.sql.schema_versions`. Run ``amqp-queue migrate`` to do it
        ahead of a deploy instead. On the store's own engine :meth:`connect` calls it; on
        an engine of yours, call it yourself.

        Safe when several processes start together on one database (sidecar replicas): on
        PostgreSQL they take turns under a transaction-level advisory lock, since two
        concurrent ``CREATE TABLE`` of one name collide in the catalog (``pg_type``'s unique
        index) rather than one of them finding the table, and two upgrades would both run;
        on SQLite the write lock (``BEGIN IMMEDIATE``) does the same. Each statement after
        the lock reads afresh (READ COMMITTED, as the rest of the store expects), so whoever
        comes second finds the revision the first committed and has nothing left to do.

        Returns:
            The schema's revision before (None for an empty database) and after.

        Raises:
            StateError: the database cannot be reached or changed, or a newer release
                has upgraded its schema beyond what this one knows.
        """
        return await self.migrate()

    async def migrate(self, revision: str = schema_versions.HEAD) -> SchemaChange:
        """Brings the schema to ``revision``, under the lock :meth:`create_table` takes.

        Args:
            revision: ``head`` (this release's schema), or an older revision to downgrade
                to before running an older release.

        Raises:
            ValueError: an unknown ``revision``.
            StateError: see :meth:`create_table`.
        """
        async with self._write() as conn:
            if conn.dialect.name == "postgresql":
                key = schema_versions.ddl_lock_key(self._schema)
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
            return await conn.run_sync(schema_versions.bring_to, self._schema, revision)

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def close(self) -> None:
        if self._writer is not None:
            async with self._writers:
                await self._writer.close()
        if self._reader is not None:
            await self._reader.close()
        if self._live_check is not None:
            self._live_check.close()
        if self._pg_reads is not None:
            await self._pg_reads.close()
        if self._pg_writes is not None:
            await self._pg_writes.close()
        await self._left.wait()  # before the engine goes: they hold its connections
        if self._owns_engine:
            await self._engine.dispose()

    # -- primitives ----------------------------------------------------------------------

    async def add(self, records: Sequence[CommandRecord]) -> int:
        return await self.write(records, ())

    async def write(self, records: Sequence[CommandRecord], published: Collection[str]) -> int:
        now, dialect = self.clock(), self._engine.dialect.name
        write = (records, published, now, dialect, self.limits, advancing(self.clock, now))
        if not records or dialect != "postgresql":
            return await self._hot("write", transactions.write, *write)
        # New commands: a COMMIT whose answer was lost is resolved before answering.
        commit: commit_doubt.Commit[int] = commit_doubt.Commit()
        try:
            return await self._committed(
                functools.partial(transactions.write, *write),
                commit,
            )
        except StateError as failure:
            await commit.settle(self._engine, [record.id for record in records], failure)
            # Written after all; how many it superseded went with the lost answer (metrics).
            return 0

    async def get(self, command_id: str) -> CommandRecord | None:
        rows = await self._one_direct(command_id)
        if rows is None:
            rows = await self._select(sql.ONE, command_id=command_id)
        return sql.record_of(rows[0]) if rows else None

    async def open_commands(self, device_id: str) -> list[CommandRecord]:
        now = self.clock()
        rows = await self._open_direct(device_id, now)
        if rows is None:
            rows = await self._select(sql.OPEN_COMMANDS, device=device_id, now=now)
        return [sql.record_of(row) for row in rows]

    async def _modify(self, command_id: str, change: Change) -> CommandRecord | None:
        if self._engine.dialect.name != "postgresql":
            return await self._hot("change", transactions.modify, command_id, change)
        modify = functools.partial(transactions.modify, command_id, change)
        return await self._rerunnable(modify, modify)

    async def _release(self, claims: Mapping[str, datetime], *, unpublish: bool) -> int:
        now = self.clock()
        # On PostgreSQL a replacement committed between the release's statements (it ends
        # what a newer command replaced, then reopens the rest) is seen by the reopening
        # only, as a unique violation of the slot. Run again, the release sees it at once
        # and ends the older command instead.
        return await self._committed(
            functools.partial(transactions.release, claims, now, unpublish=unpublish),
            retry_also=deadlock_retry.UNIQUE_VIOLATION,
        )

    async def _hold_outbox(self, owner: str) -> str:
        dialect = self._engine.dialect.name
        return await self._transaction(owners.hold_outbox, owner, dialect)

    async def _hold_relay(self, holder: str, now: datetime, until: datetime) -> bool:
        dialect = self._engine.dialect.name
        return await self._transaction(owners.hold_relay, holder, now, until, dialect)

    async def expire(self, now: datetime) -> int:
        return await self._transaction(transactions.expire, now)

    async def prune(self, before: datetime) -> int:
        return await self._transaction(transactions.prune, before)

    async def time_out(self, now: datetime) -> int:
        return await self._transaction(transactions.time_out, now)

    async def _rollout_enqueuer(self, rollout_id: str) -> tuple[bool, str | None]:
        rows = await self._select(fleet_sql.ROLLOUT_ENQUEUER, rollout=rollout_id)
        return (True, rows[0]["enqueued_by"]) if rows else (False, None)

    async def _rollout_unpublished(self, rollout_id: str, now: datetime) -> list[str]:
        rows = await self._select(fleet_sql.ROLLOUT_UNPUBLISHED, rollout=rollout_id, now=now)
        return [str(row["id"]) for row in rows]

    async def _rollout_counts(self, rollout_id: str, now: datetime) -> dict[CommandStatus, int]:
        return fleet_sql.rollout_counts(
            await self._select(fleet_sql.ROLLOUT_COUNTS, rollout=rollout_id, now=now)
        )

    async def unpublished(self, limit: int) -> list[CommandRecord]:
        # Already in ready order: the query reads the outbox index in that order.
        rows = await self._select(sql.UNPUBLISHED, now=self.clock(), limit=limit)
        return [sql.record_of(row) for row in rows]

    async def mark_published(self, command_ids: Collection[str]) -> None:
        if not command_ids:
            return
        await self.write((), command_ids)

    async def reject(self, command_ids: Collection[str]) -> int:
        if not command_ids:
            return 0
        return await self._transaction(transactions.reject, command_ids, self.clock())
