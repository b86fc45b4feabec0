"""Who enqueued, confirmed and cancelled each command, and the indexes of the fleet-wide
lists (issue 15).

``enqueued_by``, ``confirmed_by`` and ``cancelled_by`` are NULL on the rows already there:
nobody was named then. Two indexes: open commands awaiting confirmation by age (the
confirmation inbox), and a device's commands by age (its history).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

_COLUMNS = ("enqueued_by", "confirmed_by", "cancelled_by")
_AWAITS_CONFIRMATION = sa.and_(
    sa.column("delivered", sa.Boolean()) == sa.false(),
    sa.column("end_reason").is_(None),
    sa.column("requires_confirmation", sa.Boolean()) == sa.true(),
    sa.column("confirmed", sa.Boolean()) == sa.false(),
)


def _schema() -> str | None:
    # As in 0004: ALTER TABLE does not follow the connection's schema_translate_map.
    translate = op.get_bind().get_execution_options().get("schema_translate_map") or {}
    schema: str | None = translate.get(None)
    return schema


def upgrade() -> None:
    schema = _schema()
    for name in _COLUMNS:
        op.add_column("command_queue", sa.Column(name, sa.Text()), schema=schema)
    op.create_index(
        "ix_command_queue_awaiting_confirmation",
        "command_queue",
        ["created_at", "id"],
        sqlite_where=_AWAITS_CONFIRMATION,
        postgresql_where=_AWAITS_CONFIRMATION,
    )
    op.create_index(
        "ix_command_queue_device_history", "command_queue", ["device_id", "created_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_command_queue_device_history", table_name="command_queue")
    op.drop_index("ix_command_queue_awaiting_confirmation", table_name="command_queue")
    schema = _schema()
    for name in reversed(_COLUMNS):
        op.drop_column("command_queue", name, schema=schema)
