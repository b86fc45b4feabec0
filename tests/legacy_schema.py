"""The state index as releases before schema versions left it, frozen as SQL, with rows.

Written out from those releases' ``metadata.create_all`` (``git log --follow -p
state/sql/schema.py``), so the upgrade tests start from what they made, not from this code's
own revisions. Whitespace aside, the statements are as SQLAlchemy emitted them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

_TABLE = {
    "sqlite": """
        CREATE TABLE command_queue (
            seq INTEGER NOT NULL,
            id CHAR(32) NOT NULL,
            device_id TEXT NOT NULL,
            command_type TEXT,
            payload BLOB NOT NULL,
            expires_at DATETIME NOT NULL,
            delivered BOOLEAN DEFAULT 0 NOT NULL,
            requires_confirmation BOOLEAN DEFAULT 0 NOT NULL,
            confirmed BOOLEAN DEFAULT 0 NOT NULL,
            created_at DATETIME NOT NULL,
            confirmed_at DATETIME,
            end_reason TEXT,
            ended_at DATETIME,
            published_at DATETIME,
            PRIMARY KEY (seq),
            UNIQUE (id)
        )
    """,
    "postgresql": """
        CREATE TABLE command_queue (
            seq BIGSERIAL NOT NULL,
            id UUID NOT NULL,
            device_id TEXT NOT NULL,
            command_type TEXT,
            payload BYTEA NOT NULL,
            expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
            delivered BOOLEAN DEFAULT false NOT NULL,
            requires_confirmation BOOLEAN DEFAULT false NOT NULL,
            confirmed BOOLEAN DEFAULT false NOT NULL,
            created_at TIMESTAMP WITH TIME ZONE NOT NULL,
            confirmed_at TIMESTAMP WITH TIME ZONE,
            end_reason TEXT,
            ended_at TIMESTAMP WITH TIME ZONE,
            published_at TIMESTAMP WITH TIME ZONE,
            PRIMARY KEY (seq),
            UNIQUE (id)
        )
    """,
}
_FALSE = {"sqlite": "0", "postgresql": "false"}
_OPEN = "WHERE delivered = {false} AND end_reason IS NULL"
_INDEXES = (
    "CREATE INDEX ix_command_queue_device_open ON command_queue (device_id, seq) " + _OPEN,
    "CREATE INDEX ix_command_queue_ended ON command_queue (ended_at) WHERE ended_at IS NOT NULL",
    "CREATE INDEX ix_command_queue_open_expiry ON command_queue (expires_at) " + _OPEN,
    "CREATE INDEX ix_command_queue_outbox ON command_queue (seq) "
    + _OPEN
    + " AND published_at IS NULL",
    "CREATE UNIQUE INDEX uq_command_queue_dedup ON command_queue (device_id, command_type) "
    + _OPEN,
)
# 1cf03a9: the outbox in ready order (on a new table; b362c1c also on an older one).
_OUTBOX_READY = (
    "CREATE INDEX ix_command_queue_outbox_ready ON command_queue "
    "(coalesce(confirmed_at, created_at), seq) " + _OPEN + " AND published_at IS NULL"
)
# 330416c: the retired outbox index dropped.
_DROP_OUTBOX = "DROP INDEX ix_command_queue_outbox"
# ac3387f: one outbox owner.
_OWNER = (
    "CREATE TABLE command_queue_owner (role TEXT NOT NULL, owner TEXT NOT NULL, PRIMARY KEY (role))"
)

UNVERSIONED_LAYOUTS: dict[str, tuple[str, ...]] = {
    "first-release": (),
    "both-outbox-indexes": (_OUTBOX_READY,),
    "outbox-by-ready-time": (_OUTBOX_READY, _DROP_OUTBOX),
    "outbox-owner": (_OUTBOX_READY, _DROP_OUTBOX, _OWNER),
}
"""Every layout a release before schema versions could leave: what it ran after the first
release's statements. A new table of 1cf03a9 made the outbox-by-ready-time layout at once."""


def statements(dialect: str, layout: str = "first-release") -> list[str]:
    """The statements that build ``layout`` on ``dialect`` (``sqlite``, ``postgresql``)."""
    tail = [*_INDEXES, *UNVERSIONED_LAYOUTS[layout]]
    return [_TABLE[dialect], *(each.format(false=_FALSE[dialect]) for each in tail)]


# The first release's columns and types, as its rows were written.
_ROWS_TABLE = sa.table(
    "command_queue",
    sa.column("id", sa.Uuid(as_uuid=False)),
    sa.column("device_id", sa.Text()),
    sa.column("command_type", sa.Text()),
    sa.column("payload", sa.LargeBinary()),
    sa.column("expires_at", sa.DateTime(timezone=True)),
    sa.column("delivered", sa.Boolean()),
    sa.column("requires_confirmation", sa.Boolean()),
    sa.column("confirmed", sa.Boolean()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("confirmed_at", sa.DateTime(timezone=True)),
    sa.column("end_reason", sa.Text()),
    sa.column("ended_at", sa.DateTime(timezone=True)),
    sa.column("published_at", sa.DateTime(timezone=True)),
)

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
"""The clock the rows were written against; tests read them at this time."""


@dataclass(frozen=True, slots=True)
class OldRow:
    """A command as the first release stored it; ``minutes`` its age at :data:`NOW`."""

    name: str
    minutes: int
    device_id: str = "gw-1"
    command_type: str | None = None
    ttl_minutes: int = 60
    delivered: bool = False
    requires_confirmation: bool = False
    confirmed_minutes: int | None = None
    end_reason: str | None = None
    published: bool = False

    @property
    def id(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"amqp-queue-first-release/{self.name}"))

    @property
    def payload(self) -> bytes:
        return self.name.encode()

    def values(self) -> dict[str, Any]:
        created = NOW - timedelta(minutes=self.minutes)
        confirmed = self.confirmed_minutes
        finished = self.delivered or self.end_reason is not None
        return {
            "id": self.id,
            "device_id": self.device_id,
            "command_type": self.command_type,
            "payload": self.payload,
            "expires_at": created + timedelta(minutes=self.ttl_minutes),
            "delivered": self.delivered,
            "requires_confirmation": self.requires_confirmation,
            "confirmed": confirmed is not None,
            "created_at": created,
            "confirmed_at": None if confirmed is None else NOW - timedelta(minutes=confirmed),
            "end_reason": self.end_reason,
            "ended_at": NOW - timedelta(minutes=1) if finished else None,
            "published_at": created if self.published else None,
        }


OLD_ROWS = {
    row.name: row
    for row in (
        OldRow("published", 9, published=True),
        OldRow("setpoint-20", 8, command_type="setpoint"),
        OldRow("setpoint-19", 10, command_type="setpoint", end_reason="superseded"),
        OldRow("door", 7, command_type="unlock", requires_confirmation=True),
        OldRow("gate", 11, command_type="open", requires_confirmation=True, confirmed_minutes=2),
        OldRow("delivered", 12, delivered=True, published=True),
        OldRow("cancelled", 6, end_reason="cancelled"),
        OldRow("stale", 90, command_type="mode"),  # expired, not yet swept
        OldRow("other-device", 5, device_id="gw-2"),
    )
}


def insert_rows() -> sa.Insert:
    """Every row of :data:`OLD_ROWS`, in its order (the rows' ``seq``)."""
    return sa.insert(_ROWS_TABLE).values([row.values() for row in OLD_ROWS.values()])


async def run_sql(url: str, schema: str | None, *sql: str | sa.Executable) -> None:
    """Runs ``sql`` in one transaction, unqualified names resolving to ``schema``."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            if schema is not None:
                await conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
            for statement in sql:
                if isinstance(statement, str):
                    await conn.exec_driver_sql(statement)
                else:
                    await conn.execute(statement)
    finally:
        await engine.dispose()


async def build(url: str, schema: str | None, layout: str = "first-release") -> None:
    """The tables an earlier release made, with the first release's rows in them."""
    dialect = make_url(url).get_backend_name()
    await run_sql(url, schema, *statements(dialect, layout), insert_rows())
