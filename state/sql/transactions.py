"""The index's write transactions, each written once and run by either executor.

A transaction is a generator: it yields the statements to execute (the constructs of
:mod:`amqp_queue.state.sql.statements`) and is sent back each one's result, so one algorithm
per operation runs

- on PostgreSQL through asyncpg, on the driver connection
  (:class:`amqp_queue.state.sql.postgres_writes.PostgresWrites`);
- on an AsyncConnection (:func:`run`): SQLite where the store has no direct connection (in
  memory, a named schema), and PostgreSQL on another driver;
- on the SQLite writer thread's own connection
  (:class:`amqp_queue.state.sql.sqlite_writer.SqliteWriter`): the whole transaction in one
  hop from the event loop.

The executor begins and commits; a transaction only says what to execute and what it
means. On PostgreSQL one may run again after a deadlock, so each is built afresh from a
factory, and what it calls back (a :data:`~amqp_queue.state.indexed_store.Change`) is pure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncConnection

from .. import rules
from ..errors import StateError
from ..indexed_store import Change
from ..model import CommandRecord, EndReason
from ..validation import Limits
from . import statements as sql
from .now import When, read

T = TypeVar("T")

Row = dict[str, Any]

MAX_REPLACE_ATTEMPTS = 200  # a replacement that keeps losing its slot's race: a fault
DEVICES_PER_STATEMENT = 5_000
_SLICE = 5_000  # ids in one IN list: well under the drivers' parameter limits


@dataclass(frozen=True, slots=True)
class Fetch:
    """Executes once; the result is the rows it returns (a SELECT, a RETURNING)."""

    statement: sql.Statement
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Count:
    """Executes once; the result is how many rows it changed."""

    statement: sql.Statement
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Many:
    """Executes once per parameter set (``executemany``); no result."""

    statement: sql.Statement
    params: Sequence[Mapping[str, Any]]


Step = Fetch | Count | Many
Transaction = Generator[Step, object, T]


def fetch(statement: sql.Statement, params: Mapping[str, Any]) -> Transaction[list[Row]]:
    return cast(list[Row], (yield Fetch(statement, params)))


def count(statement: sql.Statement, params: Mapping[str, Any]) -> Transaction[int]:
    return cast(int, (yield Count(statement, params)))


def many(statement: sql.Statement, params: Sequence[Mapping[str, Any]]) -> Transaction[None]:
    yield Many(statement, params)


async def run_with(transaction: Transaction[T], execute: Callable[[Step], Awaitable[object]]) -> T:
    """Runs ``transaction``, each step through an executor's ``execute``, in its transaction."""
    result: object = None
    while True:
        try:
            step = transaction.send(result)
        except StopIteration as done:
            return cast(T, done.value)
        result = await execute(step)


async def run(conn: AsyncConnection, transaction: Transaction[T]) -> T:
    """Runs ``transaction`` on ``conn``, in the transaction the caller began."""

    async def execute(step: Step) -> object:
        if isinstance(step, Many):
            await conn.execute(step.statement, list(step.params))
            return None
        executed = await conn.execute(step.statement, dict(step.params))
        if isinstance(step, Count):
            return executed.rowcount
        return [dict(row._mapping) for row in executed]

    return await run_with(transaction, execute)


# -- the transactions ----------------------------------------------------------------------


def write(
    records: Sequence[CommandRecord],
    published: Collection[str],
    now: datetime,
    dialect: str,
    limits: Limits,
    held: When,
) -> Transaction[int]:
    """Inserts ``records`` device by device, each typed one replacing the open command of
    its ``(device_id, command_type)`` slot (rule 3); marks ``published`` commands published.

    No device may end up over ``limits.max_pending_per_device`` open commands by it (rule
    11): after the inserts, a write that added past the limit raises :class:`QueueFull`,
    which rolls the whole transaction back. On PostgreSQL each device's enqueues then take
    turns under an advisory lock (see :data:`~amqp_queue.state.sql.statements.LOCK_DEVICES`)
    for the count and the commit, so no two can both count without the other; SQLite's write
    lock already serialises them. See :func:`_check_room` for what the check costs.

    Within the batch the last record of a slot wins: the earlier ones are written already
    ended, so they never hold the slot. Then per slot, in record order: end its open
    command, insert the winner unless the slot is taken again, until it is in. Only on
    PostgreSQL can a slot be taken again (a concurrent transaction committed a command of
    that type after the end's snapshot); the next end (READ COMMITTED: a fresh snapshot)
    ends that one. A device's rows keep its records' order, so ``seq`` is write order;
    devices go in id order, so fan-outs naming them in other orders lock slots alike. Ending
    an open command uses ``held`` (read as the transaction runs: see END_SLOT), the rest ``now``.

    Returns:
        How many open, unexpired commands the records superseded, theirs included.
    """
    held_at = read(held)  # once: on PostgreSQL END_SLOT adds the transaction's time since
    records = sorted(records, key=lambda record: record.device_id)  # stable
    winners: dict[tuple[str, str | None], int] = {
        (record.device_id, record.command_type): index
        for index, record in enumerate(records)
        if record.command_type is not None
    }
    superseded = 0
    # Per device: open commands inserted, and open unexpired ones they replaced.
    added: Counter[str] = Counter()
    replaced: Counter[str] = Counter()
    plain: list[Row] = []
    for index, record in enumerate(records):
        row = sql.row_of(record)
        slot = (record.device_id, record.command_type)
        if winners.get(slot) == index:
            if plain:
                yield from many(sql.INSERT, plain)
                plain = []
            ended = yield from _replace(row, held_at, dialect)
            superseded += ended
            added[record.device_id] += 1
            replaced[record.device_id] += ended
            continue
        if record.command_type is not None:
            reason = rules.end_of_replaced(record, now)
            superseded += reason is EndReason.SUPERSEDED
            row["end_reason"], row["ended_at"] = reason.value, now
        else:
            added[record.device_id] += 1
        plain.append(row)
    if plain:
        yield from many(sql.INSERT, plain)
    yield from _check_room(added, replaced, now, limits, dialect)
    if published:
        yield from count(sql.MARK_PUBLISHED, {"ids": list(published), "now": now})
    return superseded


def _check_room(
    added: Counter[str], replaced: Counter[str], now: datetime, limits: Limits, dialect: str
) -> Transaction[None]:
    """Raises :class:`QueueFull` if a device holds more open commands than its limit now and
    this write added to them (``added`` more than ``replaced``).

    First a count of every open row per device, expired or not, which the partial index
    ``ix_command_queue_device_open`` answers alone; only a device over the limit by that
    bound is counted exactly (unexpired rows), and its count before this write is that
    count less what the write added net.
    """
    growing = sorted(device for device in added if added[device] > replaced[device])
    if not growing:
        return
    if dialect == "postgresql":
        # Taken here, after the inserts, so concurrent enqueues of a device wait for each
        # other only for the count and the commit; the count after the lock is a statement
        # of its own, so it sees what the writer before it committed (READ COMMITTED).
        yield from fetch(sql.LOCK_DEVICES, {"lock_keys": sql.device_lock_keys(growing)})
    bound = yield from _per_device(sql.OPEN_PER_DEVICE_BOUND, growing, now)
    crowded = [device for device in growing if bound.get(device, 0) > limits.max_pending_per_device]
    if not crowded:
        return
    after = yield from _per_device(sql.OPEN_PER_DEVICE, crowded, now)
    for device in crowded:
        now_open = after.get(device, 0)
        rules.check_room(device, now_open - added[device] + replaced[device], now_open, limits)


def _per_device(
    statement: sql.Statement, devices: list[str], now: datetime
) -> Transaction[dict[str, int]]:
    counts: dict[str, int] = {}
    # In slices: a fan-out's devices would pass the bind parameters a statement may hold.
    for start in range(0, len(devices), DEVICES_PER_STATEMENT):
        some = devices[start : start + DEVICES_PER_STATEMENT]
        rows = yield from fetch(statement, {"devices": some, "now": now})
        counts.update((str(row["device_id"]), int(row["open"])) for row in rows)
    return counts


def _replace(row: Row, now: datetime, dialect: str) -> Transaction[int]:
    """Ends the open command of the row's slot and inserts the row; returns superseded."""
    slot = {"device": row["device_id"], "kind": row["command_type"], "now": now}
    insert = sql.insert_into_free_slot(dialect)
    superseded = 0
    for _ in range(MAX_REPLACE_ATTEMPTS):
        ended = yield from fetch(sql.END_SLOT, slot)
        superseded += sum(1 for each in ended if each["end_reason"] == EndReason.SUPERSEDED.value)
        if (yield from fetch(insert, row)):
            return superseded
    raise StateError(
        f"could not replace {row['command_type']!r} for device {row['device_id']!r}: "
        f"lost the race {MAX_REPLACE_ATTEMPTS} times"
    )


def modify(command_id: str, change: Change) -> Transaction[CommandRecord | None]:
    """Reads one command under lock, applies ``change``, writes the columns it changed;
    returns the record as it now stands, None when there is no such command."""
    found = yield from fetch(sql.ONE_LOCKED, {"command_id": command_id})
    if not found:
        return None
    current = sql.record_of(found[0])
    updated = change(current)
    if updated is None:
        return current
    before, after = sql.row_of(current), sql.row_of(updated)
    changes = {name: value for name, value in after.items() if value != before[name]}
    if changes:
        statement = sql.update_by_id(tuple(sorted(changes)))
        yield from count(statement, {**changes, "command_id": command_id})
    return updated


def claim(
    device_id: str, now: datetime, command_ids: Collection[str] | None
) -> Transaction[list[CommandRecord]]:
    """Marks the device's deliverable commands (of ``command_ids`` only, if given)
    delivered; returns them in write order."""
    claimed = yield from _claim(device_id, now, command_ids, marked=False)
    return claimed.records


@dataclass(frozen=True, slots=True)
class Claimed:
    records: list[CommandRecord]
    """In write order."""
    xmin: object = None
    """The claiming transaction's id as the driver gives it (None if nothing was claimed)."""


def claim_marked(
    device_id: str, now: datetime, command_ids: Collection[str] | None
) -> Transaction[Claimed]:
    """:func:`claim` on PostgreSQL, with the id of the transaction that claimed (``xmin``):
    once the transaction is over, a row that still has it shows that the claim committed."""
    return (yield from _claim(device_id, now, command_ids, marked=True))


def _claim(
    device_id: str, now: datetime, command_ids: Collection[str] | None, *, marked: bool
) -> Transaction[Claimed]:
    params: dict[str, Any] = {"device": device_id, "now": now, "until": rules.claim_until(now)}
    if command_ids is None:
        rows = yield from fetch(sql.CLAIM_MARKED if marked else sql.CLAIM, params)
    else:
        among = sql.CLAIM_AMONG_MARKED if marked else sql.CLAIM_AMONG
        rows = yield from fetch(among, {**params, "ids": list(command_ids)})
    rows.sort(key=lambda row: int(row["seq"]))
    return Claimed(
        [sql.record_of(row) for row in rows], rows[0]["xmin"] if marked and rows else None
    )


def hand_over(
    command_ids: Collection[str], claimed_until: datetime, now: When
) -> Transaction[list[str]]:
    """Marks the claim's commands still its own delivered; returns their ids."""
    params = {"ids": list(command_ids), "claimed": claimed_until, "now": read(now)}
    rows = yield from fetch(sql.HAND_OVER, params)
    return [str(row["id"]) for row in rows]


def end_claims(command_ids: Collection[str], now: datetime) -> Transaction[int]:
    return (yield from count(sql.END_ANY_CLAIMS, {"ids": list(command_ids), "now": now}))


def drain_index(device_id: str, now: When) -> Transaction[list[CommandRecord]]:
    """A drain of the index alone: its claim and hand-over in one transaction."""
    return (yield from _drain_index(device_id, now, marked=False)).records


def drain_index_marked(device_id: str, now: When) -> Transaction[Claimed]:
    """:func:`drain_index` on PostgreSQL, with the transaction's id (see :func:`claim_marked`)."""
    return (yield from _drain_index(device_id, now, marked=True))


def _drain_index(device_id: str, when: When, *, marked: bool) -> Transaction[Claimed]:
    now = read(when)  # on SQLite after BEGIN IMMEDIATE, which waited for the lock
    claimed = yield from _claim(device_id, now, None, marked=marked)
    if not claimed.records or claimed.records[0].claimed_until is None:
        return claimed
    ids = [record.id for record in claimed.records]
    handed = set((yield from hand_over(ids, claimed.records[0].claimed_until, now)))
    records = [rules.delivered_by_hand_over(r, now) for r in claimed.records if r.id in handed]
    return Claimed(records, claimed.xmin)


def mark_delivered(command_ids: Collection[str], now: datetime) -> Transaction[int]:
    return (yield from count(sql.MARK_DELIVERED, {"ids": list(command_ids), "now": now}))


def reject(command_ids: Collection[str], now: datetime) -> Transaction[int]:
    return (yield from count(sql.REJECT, {"ids": list(command_ids), "now": now}))


def release(claims: Mapping[str, datetime], now: datetime, *, unpublish: bool) -> Transaction[int]:
    """Gives back what these claims hold or handed over; returns how many are open again."""
    opened = 0
    by_claim: dict[datetime, list[str]] = {}
    for command_id, claimed_until in claims.items():
        by_claim.setdefault(claimed_until, []).append(command_id)
    for claimed_until, command_ids in by_claim.items():
        params = {"ids": command_ids, "now": now, "claimed": claimed_until}
        opened += yield from _release(params, unpublish=unpublish)
    return opened


def _release(params: dict[str, Any], *, unpublish: bool) -> Transaction[int]:
    yield from count(sql.END_EXPIRED_CLAIMS, params)
    ended = yield from count(sql.END_CLAIMS_UNPUBLISHED if unpublish else sql.END_CLAIMS, params)
    # In rule order: an expired command stays finished, a taken slot stays its newer
    # command's; only then is the rest opened again.
    for end in sql.RELEASE_ENDS:
        yield from count(end, params)
    reopened = yield from count(sql.REOPEN_UNPUBLISHED if unpublish else sql.REOPEN, params)
    return ended + reopened


def expire(now: datetime) -> Transaction[int]:
    return (yield from count(sql.EXPIRE, {"now": now}))


def prune(before: datetime) -> Transaction[int]:
    return (yield from count(sql.PRUNE, {"before": before}))


def time_out(now: datetime) -> Transaction[int]:
    """Ends ``TIMED_OUT`` the delivered commands whose outcome deadline passed."""
    waiting = yield from fetch(sql.AWAITING_OUTCOME, {})
    overdue = [
        str(row["id"])
        for row in waiting
        if row["ended_at"] + timedelta(seconds=row["outcome_timeout"]) <= now
    ]
    ended = 0
    # In slices: one IN list of a whole rollout's ids would pass the drivers' parameter
    # limits (32,767 on asyncpg, 32,766 on SQLite), and every cleanup would fail.
    for start in range(0, len(overdue), _SLICE):
        ids = overdue[start : start + _SLICE]
        ended += yield from count(sql.TIME_OUT, {"ids": ids, "now": now})
    return ended
