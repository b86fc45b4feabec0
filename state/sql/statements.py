"""The SQL of every operation on ``command_queue``, each written once as a SQLAlchemy Core
construct, and the rows they take and give.

Every value a statement needs is a named bind parameter (``now``, ``ids``, ...), never a
value built in: the constructs are made once, here, and each executor compiles them per
dialect (SQLAlchemy's own compiled cache on an AsyncConnection,
:class:`amqp_queue.state.sql.compiled.DriverSql` on the SQLite driver), PostgreSQL and
SQLite alike. ``ids`` is an expanding list (``IN``).

Only the ``ON CONFLICT`` inserts differ per dialect, in their construct, not their SQL
(:func:`insert_into_free_slot`; the outbox owner's in :mod:`~amqp_queue.state.sql.owners`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import util as sql_util

from .. import rules
from ..model import CommandRecord, CommandStatus, EndReason
from .now import NOW as NOW  # every statement module compares with it
from .now import NowAfterLocks
from .schema import AWAITS_OUTCOME, IS_OPEN, IS_READY, READY_AT, command_queue

c = command_queue.c

Statement = sa.Select[Any] | sa.Insert | sa.Update | sa.Delete
"""What an executor runs: a construct of this module."""

FIELDS = tuple(field.name for field in dataclasses.fields(CommandRecord))
"""The columns of a record: every column but ``seq``."""
RECORD_COLUMNS = tuple(c[name] for name in FIELDS)

_UNEXPIRED = c.expires_at > NowAfterLocks()
_IDS: sa.BindParameter[Any] = sa.bindparam("ids", expanding=True)
_ONE = c.id == sa.bindparam("command_id")
_UNCLAIMED = sa.or_(c.claimed_until.is_(None), c.claimed_until <= NOW)
_CLAIMED = c.claimed_until == sa.bindparam("claimed", type_=c.claimed_until.type)
"""Under the claim whose ``claimed_until`` is ``claimed``."""
_DELIVERABLE = sa.and_(IS_OPEN, IS_READY, c.expires_at > NOW, _UNCLAIMED)


def row_of(record: CommandRecord) -> dict[str, Any]:
    """The values of :data:`INSERT` for ``record``."""
    # Not dataclasses.asdict: it deep-copies every value, the largest cost of a batch insert.
    row = {name: getattr(record, name) for name in FIELDS}
    row["end_reason"] = None if record.end_reason is None else record.end_reason.value
    row["outcome"] = None if record.outcome is None else record.outcome.value
    return row


def record_of(row: Mapping[str, Any]) -> CommandRecord:
    """The record of a row read with :data:`RECORD_COLUMNS` (and ``seq``, ignored)."""
    values = {name: row[name] for name in FIELDS}
    values["id"] = str(values["id"])
    values["payload"] = bytes(values["payload"])
    reason = values["end_reason"]
    values["end_reason"] = None if reason is None else EndReason(reason)
    outcome = values["outcome"]
    values["outcome"] = None if outcome is None else CommandStatus(outcome)
    if values["outcome_result"] is not None:
        values["outcome_result"] = bytes(values["outcome_result"])
    if values["rollout_id"] is not None:
        values["rollout_id"] = str(values["rollout_id"])
    return CommandRecord(**values)


# -- reads ---------------------------------------------------------------------------------

ONE = sa.select(*RECORD_COLUMNS).where(_ONE)
"""Any command still held (``command_id``)."""

ONE_LOCKED = ONE.with_for_update()
"""A command's row, locked until the transaction ends (``command_id``)."""

OPEN_COMMANDS = (
    sa.select(*RECORD_COLUMNS)
    .where(c.device_id == sa.bindparam("device"), IS_OPEN, c.expires_at > NOW)
    .order_by(c.seq)
)
"""A device's open, unexpired commands in write order (``device``, ``now``)."""

DELIVERABLE = sa.select(*RECORD_COLUMNS).where(c.id.in_(_IDS), _DELIVERABLE)
"""Of ``ids``, the commands open, ready and unexpired at ``now``."""

LIVE = sa.select(c.id).where(_ONE, _DELIVERABLE)
"""Whether one command (``command_id``) is open, ready and unexpired at ``now``."""

UNPUBLISHED = (
    sa.select(*RECORD_COLUMNS)
    .where(IS_OPEN, c.published_at.is_(None), IS_READY, c.expires_at > NOW)
    .order_by(READY_AT, c.seq)
    .limit(sa.bindparam("limit"))
)
"""The outbox: ready, unexpired commands not yet marked published, in ready order
(``now``, ``limit``).

The limit must cut in ready order (a command confirmed late was written early), which the
partial index ``ix_command_queue_outbox_ready`` serves without sorting.
"""


# -- writes --------------------------------------------------------------------------------

INSERT = sa.insert(command_queue).values({name: sa.bindparam(name) for name in FIELDS})
"""One row per record (:func:`row_of`)."""


@functools.cache
def insert_into_free_slot(dialect: str) -> sa.Insert:
    """:data:`INSERT` of a typed record unless its ``(device_id, command_type)`` slot holds
    an open command; returns ``seq`` when it inserted.

    On PostgreSQL a slot taken by a transaction not yet committed makes it wait for that
    one, then insert nothing: the partial unique index decides, not a snapshot.
    """
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        insert(command_queue)
        .values({name: sa.bindparam(name) for name in FIELDS})
        .on_conflict_do_nothing(index_elements=[c.device_id, c.command_type], index_where=IS_OPEN)
        .returning(c.seq)
    )


_SLOT = (c.device_id == sa.bindparam("device"), c.command_type == sa.bindparam("kind"), IS_OPEN)

END_SLOT = (
    sa.update(command_queue)
    # Its row locked first, by a subquery: PostgreSQL computes an UPDATE's new values before
    # it waits for a row that another transaction only locked, and not again after.
    .where(*_SLOT, c.id.in_(sa.select(c.id).where(*_SLOT).with_for_update()))
    .values(
        end_reason=sa.case(
            (c.expires_at <= NowAfterLocks(), EndReason.EXPIRED.value),
            else_=EndReason.SUPERSEDED.value,
        ),
        ended_at=NOW,
    )
    .returning(c.end_reason)
)
"""Ends the open command of a slot (``device``, ``kind``) as a newer one replaces it, as
:func:`amqp_queue.state.rules.end_of_replaced` says, at the time it holds the row (one
that expired while this waited for another writer's lock ends EXPIRED); returns how it
ended."""


@functools.cache
def update_by_id(columns: tuple[str, ...]) -> sa.Update:
    """Sets ``columns`` (each a bind parameter of its name) of one command (``command_id``)."""
    values: dict[str, Any] = {name: sa.bindparam(name) for name in columns}
    return sa.update(command_queue).where(_ONE).values(values)


MARK_PUBLISHED = sa.update(command_queue).where(c.id.in_(_IDS)).values(published_at=NOW)

_TAKEN_ANYWAY = sorted(rules.TAKEN_ANYWAY)
# rules.taken: open, or ended by what a device's taking overrides.
MARK_DELIVERED = (
    sa.update(command_queue)
    .where(
        c.id.in_(_IDS),
        c.delivered == sa.false(),
        sa.or_(
            c.end_reason.is_(None),
            # Constants in the SQL text: the driver paths expand only the ids.
            c.end_reason.in_(
                [sa.literal(reason.value, literal_execute=True) for reason in _TAKEN_ANYWAY]
            ),
        ),
    )
    .values(delivered=sa.true(), end_reason=None, ended_at=NOW, claimed_until=sa.null())
)

REJECT = (
    sa.update(command_queue)
    .where(c.id.in_(_IDS), IS_OPEN)
    .values(end_reason=EndReason.REJECTED.value, ended_at=NOW)
)


_HELD = command_queue.alias("held")
_FIRST_HELD = (
    sa.select(sa.func.min(_HELD.c.seq))
    .where(
        _HELD.c.device_id == sa.bindparam("device"),
        sql_util.ClauseAdapter(_HELD).traverse(sa.and_(IS_OPEN, IS_READY)),
        _HELD.c.expires_at > NOW,
        _HELD.c.claimed_until > NOW,
    )
    .scalar_subquery()
)
"""The device's first command held by another drain's live claim (rules.held_by_a_claim)."""


def _claim(among: bool) -> sa.Update:
    # Waiting for a row lock, never skipping it: the lock may be a publish mark or a
    # confirm, and a drain that skipped the row would miss a ready command. In seq order,
    # so concurrent claims lock alike; once the lock is granted PostgreSQL checks the row
    # again, so a command another drain just claimed is not claimed twice.
    candidates = sa.select(c.seq).where(c.device_id == sa.bindparam("device"), _DELIVERABLE)
    if among:
        candidates = candidates.where(c.id.in_(_IDS))
    else:
        # The whole device: up to its first command another drain holds, which the
        # commands behind it must not overtake.
        candidates = candidates.where(c.seq < sa.func.coalesce(_FIRST_HELD, c.seq + 1))
    return (
        sa.update(command_queue)
        .where(c.seq.in_(candidates.order_by(c.seq).with_for_update()))
        .values(claimed_until=sa.bindparam("until", type_=c.claimed_until.type))
        .returning(c.seq, *RECORD_COLUMNS)
    )


CLAIM = _claim(among=False)
"""Claims a device's deliverable commands until ``until`` and returns them (``device``,
``now``, ``until``)."""
CLAIM_AMONG = _claim(among=True)
""":data:`CLAIM` of those among ``ids`` only."""

XMIN: sa.ColumnClause[Any] = sa.literal_column("xmin")
"""PostgreSQL's id of the transaction that wrote a row's version (the driver's integer)."""
CLAIM_MARKED = CLAIM.returning(XMIN)
CLAIM_AMONG_MARKED = CLAIM_AMONG.returning(XMIN)
""":data:`CLAIM` and :data:`CLAIM_AMONG` on PostgreSQL, each row also with the claiming
transaction's id (``xmin``), to tell afterwards whether it committed."""
LOCK = sa.select(c.id).where(c.id.in_(_IDS)).with_for_update()
"""Locks the rows of ``ids`` (PostgreSQL; SQLite locks the whole file at BEGIN)."""
HAND_OVER = (
    sa.update(command_queue)
    .where(
        c.id.in_(_IDS),
        IS_OPEN,
        _UNEXPIRED,
        _CLAIMED,
    )
    .values(delivered=sa.true(), ended_at=NOW)
    .returning(c.id)
)
"""Of ``ids``, those still open, unexpired and claimed until ``claimed`` end delivered
(:func:`amqp_queue.state.rules.handed_over`); returns their ids (``now``): the caller has
their records as claimed, and a second copy of every row cost as much as the claim."""

WRITERS = sa.select(c.id, c.delivered, c.end_reason, c.claimed_until, XMIN).where(c.id.in_(_IDS))
"""Of ``ids``, each command's state and the transaction that last wrote it (PostgreSQL)."""

# An outcome is proof the device took the command: such a one is never given back.
# Only what a drain's hand-over delivered (rules.given_back_delivered), never a stream's mark.
_GIVEN_BACK = sa.and_(c.id.in_(_IDS), c.delivered == sa.true(), c.outcome.is_(None), _CLAIMED)
_other = command_queue.alias("other")
_SLOT_TAKEN = (
    sa.exists()
    .where(
        _other.c.device_id == c.device_id,
        _other.c.command_type == c.command_type,
        _other.c.delivered == sa.false(),
        _other.c.end_reason.is_(None),
    )
    .correlate(command_queue)
)
RELEASE_ENDS = (
    sa.update(command_queue)
    .where(_GIVEN_BACK, c.expires_at <= NOW)
    .values(delivered=sa.false(), end_reason=EndReason.EXPIRED.value, claimed_until=sa.null()),
    sa.update(command_queue)
    .where(_GIVEN_BACK, _SLOT_TAKEN)
    .values(delivered=sa.false(), end_reason=EndReason.SUPERSEDED.value, claimed_until=sa.null()),
)
"""A given-back command (of ``ids``) ends, in rule order: expired at ``now``, else its slot
is a newer command's (see :func:`amqp_queue.state.rules.released`)."""
_CLAIM_GIVEN_BACK = sa.and_(c.id.in_(_IDS), IS_OPEN, _CLAIMED)
END_EXPIRED_CLAIMS = (
    sa.update(command_queue)
    .where(_CLAIM_GIVEN_BACK, c.expires_at <= NOW)
    .values(claimed_until=sa.null())
)
"""The given-back commands (of ``ids``) claimed, open and expired at ``now``: their claims
end, not counted as open again (the expiry sweep ends them)."""
END_CLAIMS = (
    sa.update(command_queue)
    .where(_CLAIM_GIVEN_BACK, c.expires_at > NOW)
    .values(claimed_until=sa.null())
)
"""The given-back commands (of ``ids``) claimed and still open: their claims end."""
END_CLAIMS_UNPUBLISHED = END_CLAIMS.values(published_at=sa.null())
""":data:`END_CLAIMS`, for the outbox to publish them again."""
END_ANY_CLAIMS = (
    sa.update(command_queue)
    .where(c.id.in_(_IDS), IS_OPEN, c.claimed_until.is_not(None), c.expires_at > NOW)
    .values(claimed_until=sa.null())
)
"""The claims on those of ``ids`` open and unexpired end, whoever's they are (a reader of
their redelivered messages: ``IndexedStore.end_claims``)."""
REOPEN = (
    sa.update(command_queue)
    .where(_GIVEN_BACK)
    .values(delivered=sa.false(), ended_at=sa.null(), claimed_until=sa.null())
)
"""The given-back commands (of ``ids``) that did not end are open again, still published."""
REOPEN_UNPUBLISHED = REOPEN.values(published_at=sa.null())
""":data:`REOPEN`, for the outbox to publish them again."""

EXPIRE = (
    sa.update(command_queue)
    .where(IS_OPEN, c.expires_at <= NOW)
    .values(end_reason=EndReason.EXPIRED.value, ended_at=NOW)
)

_BEFORE = sa.bindparam("before", type_=c.ended_at.type)
PRUNE = sa.delete(command_queue).where(
    c.ended_at.is_not(None),
    c.ended_at < _BEFORE,
    sa.or_(c.outcome_at.is_(None), c.outcome_at < _BEFORE),
    sa.not_(AWAITS_OUTCOME),
)
"""Deletes final commands whose retention started before ``before``: ended or delivered
then, and their outcome too if they have one; never one still waiting for an outcome with
a deadline (see ``CommandRecord.pruned_after``)."""

# -- limits (rule 11) ----------------------------------------------------------------------

_DEVICES: sa.BindParameter[Any] = sa.bindparam("devices", expanding=True)

OPEN_PER_DEVICE = (
    sa.select(c.device_id, sa.func.count().label("open"))
    .where(c.device_id.in_(_DEVICES), IS_OPEN, c.expires_at > NOW)
    .group_by(c.device_id)
)
"""How many open, unexpired commands each of ``devices`` holds (no row for none)."""

OPEN_PER_DEVICE_BOUND = (
    sa.select(c.device_id, sa.func.count().label("open"))
    .where(c.device_id.in_(_DEVICES), IS_OPEN)
    .group_by(c.device_id)
)
""":data:`OPEN_PER_DEVICE` counting expired rows cleanup has not ended yet too: a bound,
answered from the partial index ``ix_command_queue_device_open`` alone (``now`` unused)."""

LOCK_BUCKETS = 256
"""How many advisory locks stand for all devices: a device takes the lock of its bucket, so
a fan-out to any number of devices takes at most this many (PostgreSQL's shared lock table
holds ``max_locks_per_transaction`` times ``max_connections``, 6,400 by default)."""
_LOCK_BASE = int.from_bytes(hashlib.sha256(b"amqp_queue.device").digest()[:4], "big") << 16


def device_lock_keys(devices: Iterable[str]) -> list[int]:
    """The advisory lock keys of these devices' buckets, sorted, each once: the same in
    every process (a digest, not Python's salted ``hash``)."""
    buckets = {
        int.from_bytes(hashlib.sha256(device.encode()).digest()[:4], "big") % LOCK_BUCKETS
        for device in devices
    }
    return sorted(_LOCK_BASE + bucket for bucket in buckets)


LOCK_DEVICES = sa.select(
    sa.func.pg_advisory_xact_lock(
        sa.func.unnest(sa.bindparam("lock_keys", type_=postgresql.ARRAY(sa.BigInteger())))
    )
)
"""PostgreSQL only: takes the transaction-level advisory locks ``lock_keys``
(:func:`device_lock_keys`), in the order given, so concurrent writers lock alike. Enqueues of
a device take turns on its lock, so the count they check the limit against cannot change
under them."""

# -- outcomes (rule 9) ---------------------------------------------------------------------

AWAITING_OUTCOME = sa.select(c.id, c.ended_at, c.outcome_timeout).where(AWAITS_OUTCOME)
"""Delivered commands with an outcome deadline and no outcome yet (their deadline is
checked in Python: interval arithmetic differs between the databases)."""

TIME_OUT = (
    sa.update(command_queue)
    .where(c.id.in_(_IDS), AWAITS_OUTCOME)
    .values(outcome=CommandStatus.TIMED_OUT.value, outcome_at=NOW)
)
"""Ends ``ids`` ``TIMED_OUT`` unless an outcome came meanwhile."""
