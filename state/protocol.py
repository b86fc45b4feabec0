"""The command-store contract every backend implements (docs/design.md, "The contract")."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from .enqueue_calls import OutcomeTimeout
from .model import (
    CommandRecord,
    CommandStatus,
    DeviceSummary,
    Outcome,
    PendingCommand,
    Position,
    Rollout,
    RolloutSummary,
)
from .validation import Ttl


@runtime_checkable
class Store(Protocol):
    """An offline command queue for devices.

    Every enqueue returns the new command's id (a UUID string). ``ttl`` is seconds or a
    ``timedelta``; ``outcome_timeout`` (keyword-only, optional) is the outcome deadline
    after delivery (rule 9). ``by`` (keyword-only, optional) names who enqueues, confirms or
    cancels, kept with the record (``enqueued_by``, ``confirmed_by``, ``cancelled_by``). An
    enqueue that would take a device over ``Limits.max_pending_per_device`` open commands
    raises ``QueueFull`` (rule 11).
    """

    async def enqueue(
        self,
        device_id: str,
        payload: bytes,
        ttl: Ttl,
        *,
        outcome_timeout: OutcomeTimeout = None,
        by: str | None = None,
    ) -> str:
        """Queues a command that is ready at once."""
        ...

    async def enqueue_or_update(
        self,
        device_id: str,
        command_type: str,
        payload: bytes,
        ttl: Ttl,
        *,
        outcome_timeout: OutcomeTimeout = None,
        by: str | None = None,
    ) -> str:
        """Queues a command that replaces the undelivered one of the same type (latest wins)."""
        ...

    async def enqueue_with_confirmation(
        self,
        device_id: str,
        command_type: str,
        payload: bytes,
        ttl: Ttl,
        *,
        outcome_timeout: OutcomeTimeout = None,
        by: str | None = None,
    ) -> str:
        """Queues a command that is delivered only after ``confirm_command``; replaces by type."""
        ...

    async def enqueue_many(
        self,
        device_ids: Iterable[str],
        payload: bytes,
        ttl: Ttl,
        *,
        command_type: str | None = None,
        requires_confirmation: bool = False,
        outcome_timeout: OutcomeTimeout = None,
        by: str | None = None,
    ) -> Rollout:
        """One command per device in one atomic write (rule 10); returns the rollout."""
        ...

    async def get_pending(self, device_id: str) -> list[PendingCommand]:
        """Every unexpired, undelivered command of the device, oldest write first."""
        ...

    async def drain_pending(self, device_id: str) -> list[bytes]:
        """Payloads of every ready command in readiness order, marked delivered.

        Cancelled once it began marking them, it runs to its end and returns them all the
        same (nobody else would get them); the cancellation stays requested, and the task's
        next drain raises it. Other awaits in between are not cancelled again, so bound a
        drain loop by a deadline around each drain, or by the loop's next drain."""
        ...

    async def get_pending_confirmations(self, device_id: str) -> list[PendingCommand]:
        """Unexpired commands still waiting for confirmation, oldest write first."""
        ...

    async def confirm_command(self, command_id: str, *, by: str | None = None) -> None:
        """Approves a command for delivery."""
        ...

    async def cancel_command(self, command_id: str, *, by: str | None = None) -> None:
        """Cancels an undelivered command."""
        ...

    async def cleanup(self) -> int:
        """Removes expired commands and returns how many; prunes old finished ones."""
        ...

    async def get_status(self, command_id: str) -> CommandStatus:
        """The command's status."""
        ...

    async def complete_command(self, command_id: str, result: bytes | None = None) -> None:
        """Records that a delivered command succeeded (rule 9)."""
        ...

    async def fail_command(self, command_id: str, reason: str) -> None:
        """Records that a delivered command failed (rule 9)."""
        ...

    async def get_outcome(self, command_id: str) -> Outcome | None:
        """The command's outcome, None while it has none."""
        ...

    async def confirm_rollout(self, rollout_id: str, *, by: str | None = None) -> int:
        """Confirms the rollout's commands awaiting confirmation; returns how many."""
        ...

    async def cancel_rollout(self, rollout_id: str, *, by: str | None = None) -> int:
        """Cancels the rollout's open commands; returns how many."""
        ...

    async def rollout_summary(self, rollout_id: str) -> RolloutSummary:
        """The rollout's commands counted by status."""
        ...

    async def rollout_enqueuer(self, rollout_id: str) -> str | None:
        """Who enqueued the rollout (its ``by``), None when nobody was named."""
        ...

    async def get_command(self, command_id: str) -> CommandRecord:
        """Everything held about one command (who enqueued, confirmed, cancelled it too)."""
        ...

    async def awaiting_confirmation(
        self,
        *,
        after: Position | None = None,
        limit: int = 100,
        device_prefix: str | None = None,
        command_type: str | None = None,
    ) -> list[CommandRecord]:
        """Commands awaiting confirmation across the fleet, oldest first, after ``after``."""
        ...

    async def devices_with_open(
        self, *, after: str | None = None, limit: int = 100
    ) -> list[DeviceSummary]:
        """Devices holding open commands, by id, after ``after``, with counts by status."""
        ...

    async def device_history(
        self, device_id: str, *, before: Position | None = None, limit: int = 100
    ) -> list[CommandRecord]:
        """The device's commands still held, newest first, before ``before``."""
        ...

    async def retire_device(self, device_id: str) -> int:
        """Cancels the device's open commands (and drops its queue); returns how many."""
        ...

    async def close(self) -> None:
        """Releases connections the store owns."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
