"""The outbox read in ready order: its index by ready time replaces the one by write order.

``ix_command_queue_outbox_ready`` replaces ``ix_command_queue_outbox`` (commits 1cf03a9 and
330416c).

``IF [NOT] EXISTS``: releases before schema versions left either index, or both, on a table
they found, and an unversioned table is stamped ``0001`` whichever it holds.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

_OPEN = sa.and_(
    sa.column("delivered", sa.Boolean()) == sa.false(), sa.column("end_reason").is_(None)
)
_UNPUBLISHED = sa.and_(_OPEN, sa.column("published_at").is_(None))
# CommandRecord.ready_at: the confirmation time where there is one, else the enqueue time.
_READY_AT: sa.ColumnElement[object] = sa.func.coalesce(
    sa.column("confirmed_at"), sa.column("created_at")
)


def upgrade() -> None:
    op.create_index(
        "ix_command_queue_outbox_ready",
        "command_queue",
        [_READY_AT, "seq"],
        sqlite_where=_UNPUBLISHED,
        postgresql_where=_UNPUBLISHED,
        if_not_exists=True,
    )
    op.drop_index("ix_command_queue_outbox", table_name="command_queue", if_exists=True)


def downgrade() -> None:
    op.create_index(
        "ix_command_queue_outbox",
        "command_queue",
        ["seq"],
        sqlite_where=_UNPUBLISHED,
        postgresql_where=_UNPUBLISHED,
    )
    op.drop_index("ix_command_queue_outbox_ready", table_name="command_queue")
