"""The ``outbox_owner`` rows: who owns the outbox, and who holds the relay's sweeping lease
(their statements and transactions)."""

from __future__ import annotations

import functools
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from .schema import outbox_owner
from .transactions import Transaction, count, fetch

OUTBOX_HOLDER = sa.select(outbox_owner.c.owner).where(outbox_owner.c.role == "outbox")
RELAY_HOLDER = sa.select(outbox_owner.c.owner).where(outbox_owner.c.role == "relay")


@functools.cache
def insert_outbox_owner(dialect: str) -> sa.Insert:
    """Records ``owner`` as the outbox's unless one is recorded."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        insert(outbox_owner)
        .values(role="outbox", owner=sa.bindparam("owner"))
        .on_conflict_do_nothing(index_elements=[outbox_owner.c.role])
    )


@functools.cache
def take_relay_lease(dialect: str) -> sa.Insert:
    """Makes ``holder`` the sweeping relay until ``until`` unless another holds the lease
    past ``now``; a holder renews (or, with ``until`` = ``now``, gives up) its own."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(outbox_owner).values(
        role="relay", owner=sa.bindparam("holder"), held_until=sa.bindparam("until")
    )
    row = outbox_owner.c
    return statement.on_conflict_do_update(
        index_elements=[row.role],
        set_={"owner": statement.excluded.owner, "held_until": statement.excluded.held_until},
        where=sa.or_(
            row.owner == statement.excluded.owner,
            row.held_until.is_(None),
            row.held_until <= sa.bindparam("now", type_=row.held_until.type),
        ),
    )


def hold_outbox(owner: str, dialect: str) -> Transaction[str]:
    yield from count(insert_outbox_owner(dialect), {"owner": owner})
    holder = yield from fetch(OUTBOX_HOLDER, {})
    return str(holder[0]["owner"])


def hold_relay(holder: str, now: datetime, until: datetime, dialect: str) -> Transaction[bool]:
    params = {"holder": holder, "now": now, "until": until}
    yield from count(take_relay_lease(dialect), params)
    rows = yield from fetch(RELAY_HOLDER, {})
    return bool(rows) and rows[0]["owner"] == holder
