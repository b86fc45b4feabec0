"""What ``consume`` and drains ask of the SQL store for every window and hand-out: claims,
liveness and delivery marks, each on the driver connection the store keeps for it where it
keeps one (:mod:`amqp_queue.state.sql.sqlite_reads`,
:mod:`amqp_queue.state.sql.postgres_reads`), else through SQLAlchemy.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from ..cancellation import finished, run_through
from ..clock import Clock, advancing
from ..errors import ClaimOutcomeUnknown, StateError
from ..model import CommandRecord
from . import commit_doubt, deadlock_retry, postgres_reads, sqlite_direct, transactions
from . import statements as sql
from .engine import driver_reason
from .execution import CUT_WRITE_WAIT, SqlExecution
from .now import When
from .postgres_reads import PostgresReads
from .sqlite_reads import SqliteLiveCheck, SqliteReader

logger = logging.getLogger("amqp_queue.state.sql")

DIRECT_FAILURES: tuple[type[Exception], ...] = (*sqlite_direct.FAILURES, *postgres_reads.FAILURES)
"""What the drivers raise where the store runs statements on them directly."""


_IDS_PER_STATEMENT = 5_000


class SqlDeliveryCalls(SqlExecution):
    """The delivery primitives of :class:`~amqp_queue.state.sql.store.SqlStore`."""

    clock: Clock
    # The driver connections the store keeps (None where it keeps none: see SqlStore).
    _reader: SqliteReader | None
    _live_check: SqliteLiveCheck | None
    _pg_reads: PostgresReads | None

    async def _claim(
        self, device_id: str, now: datetime, command_ids: Collection[str] | None
    ) -> list[CommandRecord]:
        if self._engine.dialect.name != "postgresql":
            if command_ids is not None:
                # A window of the delivery layer, whose caller awaits a cancelled claim and
                # gives back what it took (drain.py): on the writer thread, in one hop. On
                # the engine's connection a claim holds the write lock for a turn of the
                # event loop per statement, and 2,000 drains at once queued behind it.
                return await self._hot("claim", transactions.claim, device_id, now, command_ids)
            # A whole device's claim (drain_pending runs its own transaction): cut short by
            # its caller it still runs to its end, and what it claimed waits for the lease.
            return await self._transaction(transactions.claim, device_id, now, command_ids)
        # A COMMIT whose answer was lost is resolved before answering (see commit_doubt).
        commit: commit_doubt.Commit[transactions.Claimed] = commit_doubt.Commit()
        try:
            claimed = await self._committed(
                functools.partial(transactions.claim_marked, device_id, now, command_ids), commit
            )
        except StateError as failure:
            if commit.result is None:
                raise
            await commit.settle_claim(
                self._engine, commit.result.records, commit.result.xmin, failure
            )
            claimed = commit.result
        return claimed.records

    async def _drain_index(self, device: str) -> list[CommandRecord]:
        # One transaction, run to its end when the caller is cancelled, and its commands
        # returned all the same (the call completed): cut at its COMMIT it may have landed
        # (PostgreSQL), and given back, what other calls took as delivered meanwhile (a
        # replacement, a retire) would be handed out after them. On SQLite (a file's writer
        # thread, in one hop) a drain cut while it waits its turn behind other writes never
        # runs.
        if self._engine.dialect.name != "postgresql":
            now = advancing(self.clock)  # read once it holds the write lock
            return await self._hot_through("drain", transactions.drain_index, device, now)
        drained, _ = await finished(self._drain_index_once(device))
        return drained

    async def _drain_index_once(self, device: str) -> list[CommandRecord]:
        now = advancing(self.clock)  # read by each attempt (a deadlock's is run again)
        # A COMMIT whose answer was lost is resolved as a claim's is (see commit_doubt): its
        # rows keep the claim's claimed_until and its transaction id once handed over.
        commit: commit_doubt.Commit[transactions.Claimed] = commit_doubt.Commit()
        try:
            drained = await self._committed(
                functools.partial(transactions.drain_index_marked, device, now), commit
            )
        except StateError as failure:
            if commit.result is None:
                raise
            try:
                await commit.settle_claim(
                    self._engine, commit.result.records, commit.result.xmin, failure
                )
            except ClaimOutcomeUnknown as exc:
                # Maybe delivered: returned all the same. If the drain did not land, they
                # stay open and the next drain returns them again: a copy at worst.
                logger.warning("drain of %s: %s; returning what it may have taken", device, exc)
                return exc.records
            drained = commit.result
        return drained.records

    async def _hand_over(
        self, command_ids: Sequence[str], claimed_until: datetime, now: datetime
    ) -> list[str]:
        # A COMMIT whose answer was lost fails the hand-over: the drain gives its claim back,
        # which opens the commands again if it did land (nobody received them).
        hand_over = transactions.hand_over
        # Its expiry is checked at the time it holds its locks (see now.Advancing). On
        # SQLite on the writer thread, as the claim: the drain awaits a cut hand-over.
        later = advancing(self.clock, now)
        if self._engine.dialect.name != "postgresql":
            return await self._hot("hand-over", hand_over, command_ids, claimed_until, later)
        return await self._transaction(_locked_hand_over, command_ids, claimed_until, later)

    async def _end_claims(self, command_ids: Collection[str], now: datetime) -> int:
        return await self._hot("claim end", transactions.end_claims, list(command_ids), now)

    async def deliverable(self, command_ids: Collection[str]) -> dict[str, CommandRecord]:
        # A statement per _IDS_PER_STATEMENT ids (PostgreSQL binds 32,767 parameters at most).
        ids, live = list(command_ids), dict[str, CommandRecord]()
        if len(ids) <= _IDS_PER_STATEMENT:  # every window of consume() and drains
            return await self._deliverable(ids) if ids else live
        for at in range(0, len(ids), _IDS_PER_STATEMENT):
            live |= await self._deliverable(ids[at : at + _IDS_PER_STATEMENT])
        return live

    async def _deliverable(self, ids: list[str]) -> dict[str, CommandRecord]:
        now = self.clock()
        rows: list[dict[str, Any]] | None = None
        # consume() and drains ask this of every window: on the driver where one is kept.
        try:
            if self._live_check is not None:
                # A few ids (a device online): on this thread, no hop.
                rows = self._live_check.deliverable(ids, now)
            if rows is None and self._reader is not None:
                rows = await self._reader.deliverable(ids, now)
            if rows is None and self._pg_reads is not None:
                rows = await self._pg_reads.deliverable(ids, now)
        except DIRECT_FAILURES as exc:
            raise StateError(f"state index read failed: {driver_reason(exc)}") from exc
        if rows is None:
            rows = await self._select(sql.DELIVERABLE, ids=ids, now=now)
        return {record.id: record for record in map(sql.record_of, rows)}

    async def _one_direct(self, command_id: str) -> list[dict[str, Any]] | None:
        """``sql.ONE`` on the driver where one is kept, as the liveness checks read: a status
        read or a confirm's lookup of its device costs a tenth of a read through SQLAlchemy.
        None where none is kept (or SQLite answers busy): the caller reads as usual."""
        try:
            if self._live_check is not None:
                return self._live_check.one(command_id)
            if self._pg_reads is not None:
                return await self._pg_reads.one(command_id)
        except DIRECT_FAILURES as exc:
            raise StateError(f"state index read failed: {driver_reason(exc)}") from exc
        return None

    async def _open_direct(self, device_id: str, now: datetime) -> list[dict[str, Any]] | None:
        """``sql.OPEN_COMMANDS`` on a kept driver connection (a SQLite file's driver thread,
        PostgreSQL's asyncpg), as the liveness checks read: ``get_pending`` and the
        operators' list read through SQLAlchemy at a fifth of that rate. None where none
        is kept: the caller reads as usual."""
        try:
            if self._reader is not None:
                return await self._reader.open_commands(device_id, now)
            if self._pg_reads is not None:
                return await self._pg_reads.open_commands(device_id, now)
        except DIRECT_FAILURES as exc:
            raise StateError(f"state index read failed: {driver_reason(exc)}") from exc
        return None

    async def is_deliverable(self, command_id: str) -> bool:
        live: bool | None = None
        # consume() asks this before every hand-out: on the driver where one is kept.
        try:
            if self._live_check is not None:
                live = self._live_check.is_live(command_id, self.clock())
            elif self._pg_reads is not None:
                live = await self._pg_reads.is_live(command_id, self.clock())
        except DIRECT_FAILURES as exc:
            raise StateError(f"state index read failed: {driver_reason(exc)}") from exc
        if live is not None:
            return live
        return command_id in await self.deliverable([command_id])

    async def mark_delivered(self, command_ids: Collection[str]) -> int:
        # A statement per _IDS_PER_STATEMENT ids: PostgreSQL binds 32,767 parameters at most,
        # and a store's streams mark their windows together (marks are idempotent).
        ids, marked, now = list(command_ids), 0, self.clock()
        for at in range(0, len(ids), _IDS_PER_STATEMENT):
            chunk = ids[at : at + _IDS_PER_STATEMENT]
            if self._pg_reads is not None:
                # consume() marks what each loop body finished: one statement on the driver,
                # run to its end through the caller's cancellation (asyncpg's cancel would
                # spoil the connection, and the next try open another).
                marking = self._pg_mark_delivered(self._pg_reads, chunk, now)
                marked += await run_through(marking, within=CUT_WRITE_WAIT)
            else:
                marked += await self._hot("delivery mark", transactions.mark_delivered, chunk, now)
        return marked

    async def _pg_mark_delivered(
        self, direct: PostgresReads, command_ids: list[str], now: datetime
    ) -> int:
        try:
            try:
                return await direct.mark_delivered(command_ids, now)
            except DIRECT_FAILURES as exc:
                if not deadlock_retry.is_transient(exc):
                    raise
            # A deadlock victim: run again as every write transaction is (the retry loop
            # only now, its set-up costs as much as the statement).
            async for attempt in deadlock_retry.retrying():
                with attempt:
                    return await direct.mark_delivered(command_ids, now)
            raise AssertionError("unreachable: the last failure is re-raised")
        except DIRECT_FAILURES as exc:
            reason = driver_reason(exc)
            raise StateError(f"state index delivery mark failed: {reason}") from exc


def _locked_hand_over(
    command_ids: Sequence[str], claimed_until: datetime, now: When
) -> transactions.Transaction[list[str]]:
    """A hand-over on PostgreSQL: its rows locked first, so that expiry is checked once
    another writer's lock on them is granted (see :class:`~.now.NowAfterLocks`)."""
    yield from transactions.fetch(sql.LOCK, {"ids": list(command_ids)})
    return (yield from transactions.hand_over(command_ids, claimed_until, now))
