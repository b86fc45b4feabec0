"""The SQL of rollouts (rule 10) and of retiring a device: set-wide confirms and cancels,
and a rollout's counts by status, each a SQLAlchemy Core construct as in
:mod:`amqp_queue.state.sql.statements`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

from ..model import CommandStatus, EndReason
from .now import NOW, DecidedAfterLocks
from .schema import IS_OPEN, IS_READY, command_queue
from .statements import RECORD_COLUMNS

c = command_queue.c

_ROLLOUT = c.rollout_id == sa.bindparam("rollout", type_=c.rollout_id.type)
_LIVE = sa.and_(IS_OPEN, c.expires_at > NOW)
_LIVE_WHEN_LOCKED = sa.and_(IS_OPEN, c.expires_at > DecidedAfterLocks())
"""Open and unexpired when a write holds its rows: not when it was called."""


def _locking(*where: sa.ColumnElement[bool]) -> sa.Select[int]:
    # An UPDATE that waited for a row another transaction only locked does not evaluate its
    # WHERE again once it gets it: taken first, the locks are held when expiry is compared.
    # (SQLite renders no FOR UPDATE: its transaction holds the file's write lock.)
    rows = sa.select(c.id).where(*where).order_by(c.seq).with_for_update().subquery()
    return sa.select(sa.func.count()).select_from(rows)


LOCK_ROLLOUT = _locking(_ROLLOUT, IS_OPEN)
LOCK_DEVICE = _locking(c.device_id == sa.bindparam("device"), IS_OPEN)
"""Lock a rollout's (a device's) open commands before a set-wide write decides expiry."""
_BY = sa.bindparam("by", type_=sa.Text())

CONFIRM_ROLLOUT = (
    sa.update(command_queue)
    .where(
        _ROLLOUT,
        _LIVE_WHEN_LOCKED,
        c.requires_confirmation == sa.true(),
        c.confirmed == sa.false(),
    )
    .values(confirmed=sa.true(), confirmed_at=NOW, confirmed_by=_BY)
    .returning(c.seq, *RECORD_COLUMNS)
)
"""Confirms a rollout's (``rollout``) live commands awaiting confirmation, ``by`` whom;
returns them."""

CONFIRMED_BY_CALL = sa.select(c.seq, *RECORD_COLUMNS).where(
    _ROLLOUT, c.confirmed_at == NOW, c.confirmed_by.is_not_distinct_from(_BY)
)
"""A rollout's commands confirmed at ``now`` by ``by``: one call's confirms, over its runs (two
calls by the same actor at the same microsecond, as with a frozen test clock, would count each
other's; only a rerun asks)."""

CANCEL_ROLLOUT = (
    sa.update(command_queue)
    .where(_ROLLOUT, _LIVE_WHEN_LOCKED)
    .values(end_reason=EndReason.CANCELLED.value, ended_at=NOW, cancelled_by=_BY)
)
CANCEL_DEVICE = (
    sa.update(command_queue)
    .where(c.device_id == sa.bindparam("device"), _LIVE_WHEN_LOCKED)
    .values(end_reason=EndReason.CANCELLED.value, ended_at=NOW, cancelled_by=_BY)
)

_CANCELLED_BY_CALL = sa.and_(
    c.end_reason == EndReason.CANCELLED.value,
    c.ended_at == NOW,
    c.cancelled_by.is_not_distinct_from(_BY),
)
ROLLOUT_CANCELLED_BY_CALL = sa.select(sa.func.count()).where(_ROLLOUT, _CANCELLED_BY_CALL)
DEVICE_CANCELLED_BY_CALL = sa.select(sa.func.count()).where(
    c.device_id == sa.bindparam("device"), _CANCELLED_BY_CALL
)
"""How many of a rollout's (a device's) commands were cancelled at ``now`` by ``by``: one
call's cancels, over its runs."""

ROLLOUT_UNPUBLISHED = sa.select(c.id).where(_ROLLOUT, _LIVE, IS_READY, c.published_at.is_(None))
"""A rollout's (``rollout``) deliverable commands not yet marked published (``now``)."""

ROLLOUT_ENQUEUER = sa.select(c.enqueued_by).where(_ROLLOUT).limit(1)
"""Who enqueued a rollout (``rollout``): any one member says it, read from its index."""


def _counted(condition: sa.ColumnElement[bool], label: str) -> sa.Label[Any]:
    return sa.func.sum(sa.case((condition, 1), else_=0)).label(label)


_GROUPS = (c.delivered, c.outcome, c.end_reason)
ROLLOUT_COUNTS = (
    sa.select(
        *_GROUPS,
        sa.func.count().label("count"),
        _counted(c.expires_at <= NOW, "expired"),
        _counted(sa.and_(c.expires_at > NOW, sa.not_(IS_READY)), "awaiting"),
    )
    .where(_ROLLOUT)
    .group_by(*_GROUPS)
)
"""A rollout's commands (``rollout``, ``now``) grouped by what ends them, with how many of
each group are past their TTL and how many are live and awaiting confirmation: what
:func:`rollout_counts` needs to count them by status."""


def rollout_counts(rows: Iterable[Mapping[str, Any]]) -> dict[CommandStatus, int]:
    """:data:`ROLLOUT_COUNTS`' rows counted by status, as
    :func:`amqp_queue.state.rules.status_of` decides it: delivered, then the outcome;
    ended, then why; open, then expired, awaiting confirmation or pending."""
    counts: Counter[CommandStatus] = Counter()
    for row in rows:
        count = int(row["count"])
        if row["delivered"]:
            counts[CommandStatus(row["outcome"] or CommandStatus.DELIVERED)] += count
        elif row["end_reason"] is not None:
            counts[CommandStatus(row["end_reason"])] += count
        else:
            expired, awaiting = int(row["expired"]), int(row["awaiting"])
            counts[CommandStatus.EXPIRED] += expired
            counts[CommandStatus.AWAITING_CONFIRMATION] += awaiting
            counts[CommandStatus.PENDING] += count - expired - awaiting
    return dict(counts)
