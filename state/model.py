"""Records of the command queue: what callers see and what backends store."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, TypeVar, overload


class CommandStatus(enum.StrEnum):
    """Where a command is in its life; ``get_status`` answers with one of these."""

    AWAITING_CONFIRMATION = "awaiting_confirmation"
    PENDING = "pending"
    DELIVERED = "delivered"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    REJECTED = "rejected"
    """Refused for good on its way to the device (e.g. over the message size the transport
    takes)."""
    SUCCEEDED = "succeeded"
    """Delivered, and its gateway reported success (``complete_command``)."""
    FAILED = "failed"
    """Delivered, and its gateway reported failure (``fail_command``)."""
    TIMED_OUT = "timed_out"
    """Delivered, and no outcome came within its ``outcome_timeout`` (set by ``cleanup``)."""


OUTCOMES = frozenset({CommandStatus.SUCCEEDED, CommandStatus.FAILED, CommandStatus.TIMED_OUT})
"""The final statuses a delivered command can reach (DESIGN.md rule 9)."""


class EndReason(enum.StrEnum):
    """Why a command left the queue without being delivered (stored in ``end_reason``)."""

    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    EXPIRED = "expired"
    REJECTED = "rejected"


Pending = TypeVar("Pending", bound="PendingCommand")


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
class Outcome:
    """How a delivered command went, as its gateway reported it (or ``cleanup`` decided).

    ``result`` is set only for ``SUCCEEDED`` (and may be None there too), ``reason`` only
    for ``FAILED``; ``reported_at`` is when the store recorded it (timezone-aware UTC).
    """

    status: CommandStatus
    result: bytes | None
    reason: str | None
    reported_at: datetime


@dataclass(frozen=True, slots=True)
class Rollout:
    """What ``enqueue_many`` wrote: one command per device, ``command_ids`` in the order of
    the device ids given."""

    rollout_id: str
    command_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RolloutSummary:
    """A rollout's commands counted by status; ``counts`` has every status, zeros included."""

    rollout_id: str
    counts: Mapping[CommandStatus, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @classmethod
    def of(cls, rollout_id: str, counts: Mapping[CommandStatus, int]) -> RolloutSummary:
        every = {status: counts.get(status, 0) for status in CommandStatus}
        return cls(rollout_id, MappingProxyType(every))


@dataclass(frozen=True, slots=True, kw_only=True)
class Sweep:
    """What one ``cleanup`` did."""

    expired: int
    timed_out: int
    pruned: int


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    """A device with open commands (``devices_with_open``): its open, unexpired commands
    counted by status (``pending`` and ``awaiting_confirmation``)."""

    device_id: str
    pending: int
    awaiting_confirmation: int


Position = tuple[datetime, str]
"""Where a page of a fleet-wide list ends: the last command's ``created_at`` and id (lists
are ordered by both, so the next page starts right after it)."""


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """Everything a backend keeps about one command, live or finished.

    ``delivered`` and ``end_reason`` are exclusive: a command is live while neither is set.
    ``ended_at`` is when it was delivered or ended. ``published_at`` is only used by the
    outbox: when the command was handed on for delivery.

    After delivery: ``outcome`` (``SUCCEEDED``, ``FAILED`` or ``TIMED_OUT``) with
    ``outcome_result`` / ``outcome_reason`` and ``outcome_at``; ``outcome_timeout`` (seconds
    after delivery) is the deadline the enqueue set, if any. ``rollout_id`` names the
    ``enqueue_many`` call that wrote it. ``enqueued_by``, ``confirmed_by`` and
    ``cancelled_by`` name who did each (the API's token name, or what a library caller
    passed as ``by``), None when nobody was named.

    ``claimed_until``: a drain has claimed this open command and holds it until then, to
    hand it over (``delivered``) or give it back; the first phase of a drain's two-phase
    claim, invisible to every reader but delivery (see :mod:`amqp_queue.state.drain_claims`).
    The hand-over keeps it, as the token a give-back matches: only what that claim's
    hand-over delivered is reopened, never what a device's mark did (which clears it).
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
    outcome: CommandStatus | None = None
    outcome_result: bytes | None = None
    outcome_reason: str | None = None
    outcome_at: datetime | None = None
    outcome_timeout: float | None = None
    rollout_id: str | None = None
    enqueued_by: str | None = None
    confirmed_by: str | None = None
    cancelled_by: str | None = None
    claimed_until: datetime | None = None

    @property
    def awaits_outcome(self) -> bool:
        """Delivered with an outcome deadline and no outcome yet: not to be pruned."""
        return self.delivered and self.outcome is None and self.outcome_timeout is not None

    @property
    def pruned_after(self) -> datetime | None:
        """When the retention starts for this command (None: never, it is not final yet)."""
        if self.awaits_outcome:
            return None
        return self.outcome_at or self.ended_at

    def to_outcome(self) -> Outcome | None:
        if self.outcome is None or self.outcome_at is None:
            return None
        return Outcome(self.outcome, self.outcome_result, self.outcome_reason, self.outcome_at)

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

    @overload
    def to_pending(self) -> PendingCommand: ...

    @overload
    def to_pending(self, kind: type[Pending], **extra: Any) -> Pending: ...

    def to_pending(
        self, kind: type[PendingCommand] = PendingCommand, **extra: Any
    ) -> PendingCommand:
        """The command as a :class:`PendingCommand`, or as ``kind`` (a subclass of it, given
        its ``extra`` fields: what ``consume`` hands out)."""
        return kind(
            **extra,
            id=self.id,
            device_id=self.device_id,
            command_type=self.command_type,
            payload=self.payload,
            requires_confirmation=self.requires_confirmation,
            confirmed=self.confirmed,
            created_at=self.created_at,
            expires_at=self.expires_at,
        )
