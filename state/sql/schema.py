"""The ``command_queue`` table: the reference's columns plus what the design needs.

Added to the reference schema (``seed-go-package-doc.txt``):

- ``seq``: write order. Timestamps tie (fast writers, injected clocks); an integer key does
  not. ``id`` stays the public UUID, unique.
- ``confirmed_at``: a confirmed command is ready from then, which orders the drain.
- ``end_reason`` and ``ended_at``: why and when a command left the queue without being
  delivered (``delivered`` keeps its reference meaning), so ``get_status`` can tell the truth
  until ``cleanup`` prunes it after the retention.
- ``published_at``: the outbox; NULL while a ready command still has to be published.
- ``outcome``, ``outcome_result``, ``outcome_reason``, ``outcome_at``: what the gateway
  reported after delivery (rule 9); ``outcome_timeout``: the deadline after delivery, in
  seconds; ``rollout_id``: the ``enqueue_many`` call that wrote the command (rule 10).
- ``enqueued_by``, ``confirmed_by``, ``cancelled_by``: who did each (the API's token name or
  a library caller's ``by``).
- ``claimed_until``: a drain's claim on an open command, until its hand-over marks it
  delivered (see ``DrainClaims.claim``, :mod:`amqp_queue.state.drain_claims`).

The reference's partial unique index ``(device_id, command_type) WHERE delivered = false``
becomes ``... WHERE delivered = false AND end_reason IS NULL``: a cancelled, superseded,
expired or rejected command no longer holds its type's slot.

This is the newest schema, which a new database is created with. Every change to it comes
with a revision in ``migrations/versions/`` that makes it on an existing database (see
:mod:`amqp_queue.state.sql.schema_versions`); tests/test_schema_versions.py checks that the
revisions end exactly here.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Dialect


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database.

    SQLite has no time zones: values are stored as naive UTC and made aware again on read.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where UTC is required")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

command_queue = sa.Table(
    "command_queue",
    metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("id", sa.Uuid(as_uuid=False), nullable=False, unique=True),
    sa.Column("device_id", sa.Text(), nullable=False),
    sa.Column("command_type", sa.Text()),
    sa.Column("payload", sa.LargeBinary(), nullable=False),
    sa.Column("expires_at", UtcDateTime(), nullable=False),
    sa.Column("delivered", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("requires_confirmation", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("confirmed", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("confirmed_at", UtcDateTime()),
    sa.Column("end_reason", sa.Text()),
    sa.Column("ended_at", UtcDateTime()),
    sa.Column("published_at", UtcDateTime()),
    sa.Column("outcome", sa.Text()),
    sa.Column("outcome_result", sa.LargeBinary()),
    sa.Column("outcome_reason", sa.Text()),
    sa.Column("outcome_at", UtcDateTime()),
    sa.Column("outcome_timeout", sa.Float()),
    sa.Column("rollout_id", sa.Uuid(as_uuid=False)),
    sa.Column("enqueued_by", sa.Text()),
    sa.Column("confirmed_by", sa.Text()),
    sa.Column("cancelled_by", sa.Text()),
    sa.Column("claimed_until", UtcDateTime()),
)

c = command_queue.c

# Who publishes the outbox of this table (see IndexedStore.claim_outbox), and which relay
# sweeps the commands other processes left unpublished until when (IndexedStore.hold_relay):
# one row per role.
outbox_owner = sa.Table(
    "command_queue_owner",
    metadata,
    sa.Column("role", sa.Text(), primary_key=True),
    sa.Column("owner", sa.Text(), nullable=False),
    sa.Column("held_until", UtcDateTime()),
)

# One expression object for "live" so every query repeats the partial indexes' predicate to
# the letter: SQLite only uses a partial index when the query's WHERE implies the index's.
IS_OPEN = sa.and_(c.delivered == sa.false(), c.end_reason.is_(None))
IS_READY = sa.or_(c.requires_confirmation == sa.false(), c.confirmed == sa.true())

sa.Index(
    "uq_command_queue_dedup",
    c.device_id,
    c.command_type,
    unique=True,
    sqlite_where=IS_OPEN,
    postgresql_where=IS_OPEN,
)
# get_pending, drain_pending and the liveness checks all run per device on open commands.
sa.Index(
    "ix_command_queue_device_open",
    c.device_id,
    c.seq,
    sqlite_where=IS_OPEN,
    postgresql_where=IS_OPEN,
)
# cleanup's expiry sweep.
sa.Index(
    "ix_command_queue_open_expiry",
    c.expires_at,
    sqlite_where=IS_OPEN,
    postgresql_where=IS_OPEN,
)
# cleanup's retention pruning of finished commands.
sa.Index(
    "ix_command_queue_ended",
    c.ended_at,
    sqlite_where=c.ended_at.is_not(None),
    postgresql_where=c.ended_at.is_not(None),
)
# CommandRecord.ready_at: only a confirmation sets confirmed_at, and only on a command that
# requires one, so the confirmation time where there is one, else the enqueue time.
READY_AT = sa.func.coalesce(c.confirmed_at, c.created_at)
# The outbox is read as open commands not yet marked published, in ready order.
_UNPUBLISHED = sa.and_(IS_OPEN, c.published_at.is_(None))
sa.Index(
    "ix_command_queue_outbox_ready",
    READY_AT,
    c.seq,
    sqlite_where=_UNPUBLISHED,
    postgresql_where=_UNPUBLISHED,
)
# A rollout's members: its summary, confirmation and cancellation. The summary groups by
# the columns after rollout_id in their order and computes the rest of a status from the
# last three, so it reads this index alone and sorts nothing (migration 0007).
IN_ROLLOUT = c.rollout_id.is_not(None)
ROLLOUT_INDEX_COLUMNS = (
    c.rollout_id,
    c.delivered,
    c.outcome,
    c.end_reason,
    c.expires_at,
    c.requires_confirmation,
    c.confirmed,
)
sa.Index(
    "ix_command_queue_rollout",
    *ROLLOUT_INDEX_COLUMNS,
    sqlite_where=IN_ROLLOUT,
    postgresql_where=IN_ROLLOUT,
)
# cleanup's outcome deadline sweep: delivered, no outcome yet, a deadline set.
AWAITS_OUTCOME = sa.and_(
    c.delivered == sa.true(), c.outcome.is_(None), c.outcome_timeout.is_not(None)
)
sa.Index(
    "ix_command_queue_awaiting_outcome",
    c.ended_at,
    sqlite_where=AWAITS_OUTCOME,
    postgresql_where=AWAITS_OUTCOME,
)
# The fleet-wide confirmation inbox: open commands awaiting confirmation, oldest first.
AWAITS_CONFIRMATION = sa.and_(
    IS_OPEN, c.requires_confirmation == sa.true(), c.confirmed == sa.false()
)
sa.Index(
    "ix_command_queue_awaiting_confirmation",
    c.created_at,
    c.id,
    sqlite_where=AWAITS_CONFIRMATION,
    postgresql_where=AWAITS_CONFIRMATION,
)
# A device's history (every command still held), newest first.
sa.Index("ix_command_queue_device_history", c.device_id, c.created_at, c.id)
