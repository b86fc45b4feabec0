"""Records of the command queue: what callers see and what backends store."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class CommandStatus(enum.StrEnum):
    """Where a command is in its life; ``get_status`` answers with one of these."""

    AWAITING_CONFIRMATION = "awaiting_confirmation"
    PENDING = "pending"
    DELIVERED = "delivered"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    REJECTED = "rejected"
    """The broker refused it for good (e.g. over its maximum message size)."""


class EndReason(enum.StrEnum):
    """Why a command left the queue without being delivered (stored in ``end_reason``)."""

    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    EXPIRED = "expired"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class PendingCommand:
    """A command waiting for its device.

    ``command_type`` is ``None`` for a plain ``enqueue``. Datetimes are timezone-aware UTC.
    """

    id: str
    device_id: str
    command_type: str | None
    payload: bytes
    requires_confirmation: bool
    confirmed: bool
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """Everything a backend keeps about one command, live or finished.

    ``delivered`` and ``end_reason`` are exclusive: a command is live while neither is set.
    ``published_at`` is only used by the RabbitMQ delivery layer (the outbox).
    """

    id: str
    device_id: str
    command_type: str | None
    payload: bytes
    requires_confirmation: bool
    confirmed: bool
    created_at: datetime
    expires_at: datetime
    confirmed_at: datetime | None = None
    delivered: bool = False
    end_reason: EndReason | None = None
    ended_at: datetime | None = None
    published_at: datetime | None = None

    @property
    def is_open(self) -> bool:
        """Neither delivered nor ended (it may still have expired by the clock)."""
        return not self.delivered and self.end_reason is None

    @property
    def is_ready(self) -> bool:
        """Deliverable as far as confirmation goes."""
        return not self.requires_confirmation or self.confirmed

    @property
    def ready_at(self) -> datetime:
        """When the command became ready: enqueue time, or confirmation time."""
        if self.requires_confirmation and self.confirmed_at is not None:
            return self.confirmed_at
        return self.created_at

    def to_pending(self) -> PendingCommand:
        return PendingCommand(
            id=self.id,
            device_id=self.device_id,
            command_type=self.command_type,
            payload=self.payload,
            requires_confirmation=self.requires_confirmation,
            confirmed=self.confirmed,
            created_at=self.created_at,
            expires_at=self.expires_at,
        )
