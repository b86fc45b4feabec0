"""Outcomes after delivery, outcome deadlines and rollouts (issue 14).

``outcome`` (``succeeded``, ``failed``, ``timed_out``), ``outcome_result``,
``outcome_reason``, ``outcome_at``, ``outcome_timeout`` (seconds after delivery) and
``rollout_id`` (the ``enqueue_many`` call), all NULL on the rows already there: they keep
their meaning (a delivered row without an outcome is DELIVERED). Two partial indexes: a
rollout's members, and delivered commands waiting for an outcome with a deadline.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

_IN_ROLLOUT = sa.column("rollout_id").is_not(None)
_AWAITS_OUTCOME = sa.and_(
    sa.column("delivered", sa.Boolean()) == sa.true(),
    sa.column("outcome").is_(None),
    sa.column("outcome_timeout").is_not(None),
)


_COLUMNS = (
    ("outcome", sa.Text),
    ("outcome_result", sa.LargeBinary),
    ("outcome_reason", sa.Text),
    ("outcome_at", lambda: sa.DateTime(timezone=True)),
    ("outcome_timeout", sa.Float),
    ("rollout_id", lambda: sa.Uuid(as_uuid=False)),
)


def _schema() -> str | None:
    # ALTER TABLE is Alembic's own construct, which the connection's schema_translate_map
    # (where the caller names the schema) does not reach; CREATE INDEX is SQLAlchemy's.
    translate = op.get_bind().get_execution_options().get("schema_translate_map") or {}
    schema: str | None = translate.get(None)
    return schema


def upgrade() -> None:
    schema = _schema()
    for name, kind in _COLUMNS:
        op.add_column("command_queue", sa.Column(name, kind()), schema=schema)
    op.create_index(
        "ix_command_queue_rollout",
        "command_queue",
        ["rollout_id"],
        sqlite_where=_IN_ROLLOUT,
        postgresql_where=_IN_ROLLOUT,
    )
    op.create_index(
        "ix_command_queue_awaiting_outcome",
        "command_queue",
        ["ended_at"],
        sqlite_where=_AWAITS_OUTCOME,
        postgresql_where=_AWAITS_OUTCOME,
    )


def downgrade() -> None:
    op.drop_index("ix_command_queue_awaiting_outcome", table_name="command_queue")
    op.drop_index("ix_command_queue_rollout", table_name="command_queue")
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), not a batch copy of the table,
    # which would have to reflect (and could lose) the expression and partial indexes.
    schema = _schema()
    for name, _ in reversed(_COLUMNS):
        op.drop_column("command_queue", name, schema=schema)
