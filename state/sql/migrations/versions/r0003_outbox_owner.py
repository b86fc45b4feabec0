"""One outbox owner: ``command_queue_owner`` names who publishes the table's outbox.

One row (commit ac3387f).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_table(
        "command_queue_owner",
        sa.Column("role", sa.Text(), primary_key=True),
        sa.Column("owner", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("command_queue_owner")
