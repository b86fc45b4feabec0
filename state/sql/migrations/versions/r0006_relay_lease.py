"""The relay lease: ``command_queue_owner.held_until``.

One relay at a time sweeps the commands other processes wrote and left unpublished (a
sidecar killed between its write and its publish); the ``relay`` row names it and says
until when. Rows already there (the ``outbox`` owner) keep NULL: that role never expires. A
``relay`` row left after a downgrade is harmless: earlier releases read only ``outbox``.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None


def _schema() -> str | None:
    # As in 0004: ALTER TABLE does not follow the connection's schema_translate_map.
    translate = op.get_bind().get_execution_options().get("schema_translate_map") or {}
    schema: str | None = translate.get(None)
    return schema


def upgrade() -> None:
    op.add_column(
        "command_queue_owner",
        sa.Column("held_until", sa.DateTime(timezone=True)),
        schema=_schema(),
    )


def downgrade() -> None:
    op.drop_column("command_queue_owner", "held_until", schema=_schema())
