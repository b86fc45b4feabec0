"""A drain's claim: ``command_queue.claimed_until``.

A drain claimed its commands by marking them delivered, and every other reader took the
claim for a delivery until the drain handed the commands over or gave them back. A claim now
holds an open command until ``claimed_until`` (delivery skips it, every other reader sees it
open) and the hand-over marks it delivered. Rows already there keep NULL: not claimed. After
a downgrade, a claim left open reads as an open command, deliverable again.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None


def _schema() -> str | None:
    # As in 0004: ALTER TABLE does not follow the connection's schema_translate_map.
    translate = op.get_bind().get_execution_options().get("schema_translate_map") or {}
    schema: str | None = translate.get(None)
    return schema


def upgrade() -> None:
    op.add_column(
        "command_queue",
        sa.Column("claimed_until", sa.DateTime(timezone=True)),
        schema=_schema(),
    )


def downgrade() -> None:
    op.drop_column("command_queue", "claimed_until", schema=_schema())
