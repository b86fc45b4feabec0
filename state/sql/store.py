"""SqlStore: the state index on SQLAlchemy 2 async, SQLite or PostgreSQL from one code path.

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
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import rules
from ..clock import Clock, utc_now
from ..errors import StateError
from ..indexed_store import DEFAULT_RETENTION, Change, IndexedStore
from ..model import CommandRecord, EndReason
from ..validation import DEFAULT_LIMITS, Limits
from . import deadlock_retry, schema_versions, sqlite_direct
from .engine import READ_ONLY, create_engine
from .schema import (
    IS_OPEN,
    IS_READY,
    READY_AT,
    command_queue,
    outbox_owner,
)
from .schema_versions import SchemaChange
from .sqlite_direct import SqliteLiveCheck, SqliteReader, SqliteWriter

logger = logging.getLogger("amqp_queue.state.sql")

c = command_queue.c
_RECORD_COLUMNS = tuple(c[field.name] for field in dataclasses.fields(CommandRecord))
# A replacement that keeps losing the race for its type's slot means something is wrong.
_MAX_REPLACE_ATTEMPTS = 200

T = TypeVar("T")


class SqlStore(IndexedStore):
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
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        # The hot paths' own SQL names the table without a schema, and their connections
        # run no ATTACH: with a schema, every statement goes through SQLAlchemy.
        fast = schema is None and sqlite_direct.usable(engine)
        self._fast = SqliteWriter(engine) if fast else None
        self._fast_reads = SqliteReader(engine) if fast else None
        self._live_check = SqliteLiveCheck(engine) if fast else None

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
                key = _ddl_lock_key(self._schema)
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
            return await conn.run_sync(schema_versions.bring_to, self._schema, revision)

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def close(self) -> None:
        if self._fast is not None:
            async with self._writers:
                await self._fast.close()
        if self._fast_reads is not None:
            await self._fast_reads.close()
        if self._live_check is not None:
            self._live_check.close()
        if self._owns_engine:
            await self._engine.dispose()

    # -- primitives ----------------------------------------------------------------------

    async def add(self, records: Sequence[CommandRecord]) -> int:
        return await self.write(records, ())

    async def write(self, records: Sequence[CommandRecord], published: Collection[str]) -> int:
        now = self.clock()
        if self._fast is not None:
            # SQLite: one writer at a time (BEGIN IMMEDIATE), so a batch replaces without
            # racing anybody, in a few statements each run over all its rows.
            rows, replaced, superseded = _batch_rows(records, now)
            async with self._fast_write("write"):
                return superseded + await self._fast.write(rows, published, now, replaced=replaced)

        async def add_and_mark(conn: AsyncConnection) -> int:
            superseded = await self._add(conn, records, now)
            if published:
                await conn.execute(_mark_published(published, now))
            return superseded

        return await self._transaction(add_and_mark)

    async def _add(
        self, conn: AsyncConnection, records: Sequence[CommandRecord], now: datetime
    ) -> int:
        superseded = 0
        plain: list[dict[str, Any]] = []
        for record in records:
            if record.command_type is None:
                plain.append(_row(record))
                continue
            if plain:
                await conn.execute(sa.insert(command_queue), plain)
                plain = []
            superseded += await self._replace(conn, record, now)
        if plain:
            await conn.execute(sa.insert(command_queue), plain)
        return superseded

    async def _replace(self, conn: AsyncConnection, record: CommandRecord, now: datetime) -> int:
        """Ends the open command of the record's type, inserts the record; returns superseded."""
        same_slot = sa.and_(
            c.device_id == record.device_id, c.command_type == record.command_type, IS_OPEN
        )
        end_previous = (
            sa.update(command_queue)
            .where(same_slot)
            .values(
                end_reason=sa.case(
                    (c.expires_at <= now, EndReason.EXPIRED.value),
                    else_=EndReason.SUPERSEDED.value,
                ),
                ended_at=now,
            )
            .returning(c.end_reason)
        )
        insert = (
            self._insert(command_queue)
            .values(_row(record))
            .on_conflict_do_nothing(
                index_elements=[c.device_id, c.command_type], index_where=IS_OPEN
            )
            .returning(c.seq)
        )
        superseded = 0
        for _ in range(_MAX_REPLACE_ATTEMPTS):
            ended: Sequence[str] = (await conn.execute(end_previous)).scalars().all()
            superseded += sum(reason == EndReason.SUPERSEDED.value for reason in ended)
            if (await conn.execute(insert)).first() is not None:
                return superseded
            # A concurrent transaction committed a command of this type after our UPDATE's
            # snapshot; the next UPDATE (READ COMMITTED: a fresh snapshot) supersedes it.
        raise StateError(
            f"could not replace {record.command_type!r} for device {record.device_id!r}: "
            f"lost the race {_MAX_REPLACE_ATTEMPTS} times"
        )

    async def get(self, command_id: str) -> CommandRecord | None:
        async with self._read() as conn:
            row = (await conn.execute(_select().where(c.id == command_id))).first()
        return None if row is None else _record(row)

    async def open_commands(self, device_id: str) -> list[CommandRecord]:
        query = (
            _select()
            .where(c.device_id == device_id, IS_OPEN, c.expires_at > self.clock())
            .order_by(c.seq)
        )
        async with self._read() as conn:
            return [_record(row) for row in await conn.execute(query)]

    async def _modify(self, command_id: str, change: Change) -> CommandRecord | None:
        if self._fast is not None:
            return await self._fast_modify(command_id, change)

        async def locked_change(conn: AsyncConnection) -> CommandRecord | None:
            query = _select().where(c.id == command_id).with_for_update()
            row = (await conn.execute(query)).first()
            if row is None:
                return None
            current = _record(row)
            updated = change(current)
            if updated is None:
                return current
            changes = {
                field.name: getattr(updated, field.name)
                for field in dataclasses.fields(CommandRecord)
                if getattr(updated, field.name) != getattr(current, field.name)
            }
            if changes:
                await conn.execute(
                    sa.update(command_queue).where(c.id == command_id).values(changes)
                )
            return updated

        return await self._transaction(locked_change)

    async def _fast_modify(self, command_id: str, change: Change) -> CommandRecord | None:
        """``_modify`` on SQLite on the writer thread (confirm and cancel: one hop)."""
        assert self._fast is not None
        outcome: list[CommandRecord] = []

        def changed_columns(values: dict[str, Any]) -> dict[str, Any] | None:
            current = _from_columns(values)
            updated = change(current)
            outcome.append(current if updated is None else updated)
            if updated is None:
                return None
            before, after = _row(current), _row(updated)
            return {name: value for name, value in after.items() if value != before[name]}

        async with self._fast_write("change"):
            await self._fast.modify(command_id, changed_columns)
        return outcome[0] if outcome else None

    async def _claim(
        self, device_id: str, now: datetime, command_ids: Collection[str] | None
    ) -> list[CommandRecord]:
        candidates = sa.select(c.seq).where(
            c.device_id == device_id, IS_OPEN, IS_READY, c.expires_at > now
        )
        if command_ids is not None:
            candidates = candidates.where(c.id.in_(list(command_ids)))
        # Waiting for a row lock, never skipping it: the lock may be a publish mark or a
        # confirm, and a drain that skipped the row would miss a ready command. In seq order,
        # so concurrent claims lock alike; once the lock is granted PostgreSQL checks the row
        # again, so a command another drain just claimed is not claimed twice.
        claim = (
            sa.update(command_queue)
            .where(c.seq.in_(candidates.order_by(c.seq).with_for_update()))
            .values(delivered=True, ended_at=now)
            .returning(c.seq, *_RECORD_COLUMNS)
        )

        async def execute(conn: AsyncConnection) -> Sequence[sa.Row[Any]]:
            return (await conn.execute(claim)).all()

        rows = await self._transaction(execute)
        return [_record(row) for row in sorted(rows, key=lambda row: row.seq)]

    async def deliverable(self, command_ids: Collection[str]) -> dict[str, CommandRecord]:
        if not command_ids:
            return {}
        if self._fast_reads is not None:
            # consume() and drains ask this of every window: one hop to the driver's thread.
            try:
                rows = await self._fast_reads.deliverable(list(command_ids), self.clock())
            except sqlite_direct.FAILURES as exc:
                raise StateError(f"state index read failed: {exc}") from exc
            return {record.id: record for record in map(_from_columns, rows)}
        query = _select().where(
            c.id.in_(list(command_ids)), IS_OPEN, IS_READY, c.expires_at > self.clock()
        )
        async with self._read() as conn:
            records = [_record(row) for row in await conn.execute(query)]
        return {record.id: record for record in records}

    async def is_deliverable(self, command_id: str) -> bool:
        if self._live_check is not None:
            try:
                live = self._live_check.is_live(command_id, self.clock())
            except sqlite_direct.FAILURES as exc:
                raise StateError(f"state index read failed: {exc}") from exc
            if live is not None:
                return live
        return await super().is_deliverable(command_id)

    async def mark_delivered(self, command_ids: Collection[str]) -> int:
        if not command_ids:
            return 0
        if self._fast is not None:
            async with self._fast_write("delivery mark"):
                return await self._fast.mark_delivered(command_ids, self.clock())
        update = (
            sa.update(command_queue)
            .where(c.id.in_(list(command_ids)), IS_OPEN)
            .values(delivered=True, ended_at=self.clock())
        )
        return await self._rowcount(update)

    async def _release(self, command_ids: Collection[str], *, unpublish: bool) -> int:
        now = self.clock()
        given_back = sa.and_(c.id.in_(list(command_ids)), c.delivered == sa.true())
        other = command_queue.alias("other")
        slot_taken = (
            sa.exists()
            .where(
                other.c.device_id == c.device_id,
                other.c.command_type == c.command_type,
                other.c.delivered == sa.false(),
                other.c.end_reason.is_(None),
            )
            .correlate(command_queue)
        )
        ends = (
            (c.expires_at <= now, EndReason.EXPIRED),
            (slot_taken, EndReason.SUPERSEDED),
        )
        reopened: dict[str, Any] = {"delivered": False, "ended_at": None}
        if unpublish:
            reopened["published_at"] = None

        async def give_back(conn: AsyncConnection) -> int:
            # In rule order: an expired command stays finished, a taken slot stays its
            # newer command's; only then is the rest opened again.
            for condition, reason in ends:
                await conn.execute(
                    sa.update(command_queue)
                    .where(given_back, condition)
                    .values(delivered=False, end_reason=reason.value)
                )
            opened = await conn.execute(sa.update(command_queue).where(given_back).values(reopened))
            return opened.rowcount

        return await self._transaction(give_back)

    async def _hold_outbox(self, owner: str) -> str:
        claim = (
            self._insert(outbox_owner)
            .values(role="outbox", owner=owner)
            .on_conflict_do_nothing(index_elements=[outbox_owner.c.role])
        )
        holder = sa.select(outbox_owner.c.owner).where(outbox_owner.c.role == "outbox")

        async def hold(conn: AsyncConnection) -> str:
            await conn.execute(claim)
            return str((await conn.execute(holder)).scalar_one())

        return await self._transaction(hold)

    async def expire(self, now: datetime) -> int:
        update = (
            sa.update(command_queue)
            .where(IS_OPEN, c.expires_at <= now)
            .values(end_reason=EndReason.EXPIRED.value, ended_at=now)
        )
        return await self._rowcount(update)

    async def prune(self, before: datetime) -> int:
        delete = sa.delete(command_queue).where(c.ended_at.is_not(None), c.ended_at < before)
        return await self._rowcount(delete)

    async def unpublished(self, limit: int) -> list[CommandRecord]:
        query = unpublished_query(self.clock(), limit)
        async with self._read() as conn:
            # Already in ready order: the query reads the outbox index in that order.
            return [_record(row) for row in await conn.execute(query)]

    async def mark_published(self, command_ids: Collection[str]) -> None:
        if not command_ids:
            return
        await self.write((), command_ids)

    async def reject(self, command_ids: Collection[str]) -> int:
        if not command_ids:
            return 0
        update = (
            sa.update(command_queue)
            .where(c.id.in_(list(command_ids)), IS_OPEN)
            .values(end_reason=EndReason.REJECTED.value, ended_at=self.clock())
        )
        return await self._rowcount(update)

    # -- transactions ----------------------------------------------------------------------

    async def _transaction(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Runs ``work`` in one write transaction, again if PostgreSQL aborted it as a
        deadlock victim or a serialization failure (see
        :mod:`amqp_queue.state.sql.deadlock_retry`)."""
        async for attempt in deadlock_retry.retrying():
            with attempt:
                async with self._write() as conn:
                    return await work(conn)
        raise AssertionError("unreachable: the last failure is re-raised")

    async def _rowcount(self, statement: sa.Update | sa.Delete) -> int:
        async def execute(conn: AsyncConnection) -> int:
            return (await conn.execute(statement)).rowcount

        return await self._transaction(execute)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self._writers, self._engine.begin() as conn:
                if self._sqlite:
                    await conn.run_sync(_take_write_lock)
                yield conn
        except (SQLAlchemyError, OSError) as exc:
            raise StateError(f"state index write failed: {exc}") from exc

    @asynccontextmanager
    async def _fast_write(self, what: str) -> AsyncIterator[None]:
        try:
            async with self._writers:
                yield
        except (*sqlite_direct.FAILURES, SQLAlchemyError) as exc:
            raise StateError(f"state index {what} failed: {exc}") from exc

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self._engine.connect() as conn:
                await conn.execution_options(**{READ_ONLY: True})
                async with conn.begin():
                    yield conn
        except (SQLAlchemyError, OSError) as exc:
            raise StateError(f"state index read failed: {exc}") from exc


def _take_write_lock(connection: sa.Connection) -> None:
    """Starts the SQLite transaction with ``BEGIN IMMEDIATE`` unless the engine's own
    ``begin`` listener already began one (:func:`amqp_queue.state.sql.engine.configure_sqlite`).

    On an engine without it the driver begins a transaction only before a write, so a read
    and the write it decides (cancel, confirm, a replacement) would not be atomic. Should a
    caller's engine begin deferred transactions itself, the store's run in them: SQLite then
    refuses a write after a stale read ("database is locked"), never makes it.
    """
    driver = connection.connection.driver_connection
    if driver is None or not driver.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _ddl_lock_key(schema: str | None) -> int:
    """The advisory lock key for creating or upgrading ``command_queue`` in ``schema``: the
    same in every process (a digest, not Python's per-process salted ``hash``), as the signed
    64-bit integer ``pg_advisory_xact_lock`` takes. Unchanged since releases before schema
    versions, so in a rolling deploy their replicas take turns with this one's."""
    name = f"amqp_queue.create_table:{schema or ''}.{command_queue.name}"
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def unpublished_query(now: datetime, limit: int) -> sa.Select[Any]:
    """The outbox: ready, unexpired commands the broker has not confirmed, in ready order.

    The limit must cut in ready order (a command confirmed late was written early), which
    the partial index ``ix_command_queue_outbox_ready`` serves without sorting.
    """
    return (
        _select()
        .where(IS_OPEN, c.published_at.is_(None), IS_READY, c.expires_at > now)
        .order_by(READY_AT, c.seq)
        .limit(limit)
    )


def _mark_published(command_ids: Collection[str], now: datetime) -> sa.Update:
    return sa.update(command_queue).where(c.id.in_(list(command_ids))).values(published_at=now)


def _select() -> sa.Select[Any]:
    return sa.select(*_RECORD_COLUMNS)


_FIELDS = tuple(field.name for field in dataclasses.fields(CommandRecord))


def _row(record: CommandRecord) -> dict[str, Any]:
    # Not dataclasses.asdict: it deep-copies every value, the largest cost of a batch insert.
    row = {name: getattr(record, name) for name in _FIELDS}
    row["end_reason"] = None if record.end_reason is None else record.end_reason.value
    return row


def _batch_rows(
    records: Sequence[CommandRecord], now: datetime
) -> tuple[list[dict[str, Any]], list[tuple[str, str]], int]:
    """The rows of a batch written at once, the slots whose open command they replace, and
    how many of the batch's own records a later one of the same slot supersedes.

    Within a batch the last record of a slot wins (rule 3): the earlier ones are written as
    already ended, so the slot's partial unique index holds at every insert.
    """
    latest = {
        (record.device_id, record.command_type): index
        for index, record in enumerate(records)
        if record.command_type is not None
    }
    rows: list[dict[str, Any]] = []
    superseded = 0
    for index, record in enumerate(records):
        row = _row(record)
        kind = record.command_type
        if kind is not None and latest[(record.device_id, kind)] != index:
            reason = rules.end_of_replaced(record, now)
            superseded += reason is EndReason.SUPERSEDED
            row["end_reason"], row["ended_at"] = reason.value, now
        rows.append(row)
    return rows, list(latest), superseded


def _record(row: sa.Row[Any]) -> CommandRecord:
    return _from_columns(dict(row._mapping))


def _from_columns(values: dict[str, Any]) -> CommandRecord:
    values.pop("seq", None)
    values["id"] = str(values["id"])
    values["payload"] = bytes(values["payload"])
    reason = values["end_reason"]
    values["end_reason"] = None if reason is None else EndReason(reason)
    return CommandRecord(**values)
