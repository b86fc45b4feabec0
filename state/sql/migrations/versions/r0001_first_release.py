"""The first release's schema: ``command_queue`` and its partial indexes.

Frozen as that release's ``metadata.create_all`` made them (commit 8f937ff), with the outbox
read in write order (``ix_command_queue_outbox``). A table made by a release before schema
versions has no version table: opening it stamps it with this revision, or a later one
it already matches (see ``schema_versions``), and upgrades it.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

# Table-less columns: the index predicates render as create_all rendered them
# ("delivered = 0" on SQLite, "delivered = false" on PostgreSQL).
_OPEN = sa.and_(
    sa.column("delivered", sa.Boolean()) == sa.false(), sa.column("end_reason").is_(None)
)
_UNPUBLISHED = sa.and_(_OPEN, sa.column("published_at").is_(None))
_ENDED = sa.column("ended_at").is_not(None)


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _partial_index(
    name: str, columns: list[str], where: sa.ColumnElement[bool], *, unique: bool = False
) -> None:
    op.create_index(
        name, "command_queue", columns, unique=unique, sqlite_where=where, postgresql_where=where
    )


def upgrade() -> None:
    op.create_table(
        "command_queue",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("id", sa.Uuid(as_uuid=False), nullable=False, unique=True),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("command_type", sa.Text()),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("expires_at", _utc(), nullable=False),
        sa.Column("delivered", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("requires_confirmation", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("confirmed", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("confirmed_at", _utc()),
        sa.Column("end_reason", sa.Text()),
        sa.Column("ended_at", _utc()),
        sa.Column("published_at", _utc()),
    )
    _partial_index("uq_command_queue_dedup", ["device_id", "command_type"], _OPEN, unique=True)
    _partial_index("ix_command_queue_device_open", ["device_id", "seq"], _OPEN)
    _partial_index("ix_command_queue_open_expiry", ["expires_at"], _OPEN)
    _partial_index("ix_command_queue_ended", ["ended_at"], _ENDED)
    _partial_index("ix_command_queue_outbox", ["seq"], _UNPUBLISHED)


def downgrade() -> None:
    op.drop_table("command_queue")
