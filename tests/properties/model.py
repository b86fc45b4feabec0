"""A small reference model of the rules in docs/design.md, written from the text, not from the code.

It deliberately shares nothing with ``state.rules``: every backend is compared with it step by
step, so a rule misread in one place shows up as a disagreement instead of being copied.

Interpretations where docs/design.md leaves room (each one also what a careful reader would pick):

- A command is expired from the instant ``now >= created + ttl``.
- An expired command stays "open" until ``cleanup`` (or a replacement of its type) notices it;
  it finishes then, and the retention of rule 6 counts from then.
- Confirming or cancelling a command that needs no confirmation, or confirming one that was
  delivered, is harmless (confirm) or "already delivered" (cancel).
- Outcomes (rule 9): a report on a delivered command is kept and is its status from then; a
  delivered command with a deadline and no report by ``delivered + outcome_timeout`` ends
  ``timed_out`` at ``cleanup``; a final command's retention counts from its report (or its
  end), and a delivered one still waiting for its deadline is not pruned.
- Limits (rule 11): "open" is unexpired and not finished; an enqueue adds one unless it
  replaces an open, unexpired command of its type.
- Rollouts (rule 10): confirm/cancel touch only members still open and unexpired; a rollout
  whose members were all pruned is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from amqp_queue.state import (
    CommandExpired,
    CommandNotFound,
    CommandStatus,
    OutcomeRejected,
    QueueFull,
    RolloutNotFound,
)

Outcome = str  # "delivered" | "cancelled" | "superseded" | "expired"
Report = tuple[CommandStatus, bytes | None, str | None]


@dataclass
class Command:
    id: str
    device: str
    command_type: str | None
    payload: bytes
    needs_confirmation: bool
    written: int
    created: datetime
    expires: datetime
    confirmed_at: datetime | None = None
    outcome: Outcome | None = None
    finished_at: datetime | None = None
    outcome_timeout: float | None = None
    rollout: str | None = None
    report: Report | None = None
    reported_at: datetime | None = None

    def is_open(self) -> bool:
        return self.outcome is None

    def expired(self, now: datetime) -> bool:
        return self.outcome == "expired" or (self.is_open() and now >= self.expires)

    def ready(self) -> bool:
        return not self.needs_confirmation or self.confirmed_at is not None

    def became_ready(self) -> datetime:
        return self.confirmed_at if self.confirmed_at is not None else self.created

    def finish(self, outcome: Outcome, now: datetime) -> None:
        self.outcome, self.finished_at = outcome, now


class Model:
    """Every command the system should still hold, by id."""

    def __init__(self, retention: timedelta, limit: int) -> None:
        self.retention = retention
        self.limit = limit
        self.commands: dict[str, Command] = {}
        self._writes = 0

    def refusal(
        self, devices: list[tuple[str, str | None]], now: datetime
    ) -> type[Exception] | None:
        """Rule 11, before an enqueue of these (device, type) pairs: QueueFull or None."""
        for device in {device for device, _ in devices}:
            held = [c for c in self.commands.values() if c.device == device]
            live = [c for c in held if c.is_open() and now < c.expires]
            types = {c.command_type for c in live if c.command_type is not None}
            added = 0
            for _, command_type in (pair for pair in devices if pair[0] == device):
                if command_type is None or command_type not in types:
                    added += 1
            if added and len(live) + added > self.limit:
                return QueueFull
        return None

    def enqueue(
        self,
        command_id: str,
        device: str,
        command_type: str | None,
        payload: bytes,
        ttl: float,
        needs_confirmation: bool,
        now: datetime,
        outcome_timeout: float | None = None,
        rollout: str | None = None,
    ) -> None:
        assert command_id not in self.commands, "an enqueue returned an id already in use"
        if command_type is not None:
            for other in self.commands.values():
                if (other.device, other.command_type) == (device, command_type) and other.is_open():
                    other.finish("expired" if now >= other.expires else "superseded", now)
        self._writes += 1
        self.commands[command_id] = Command(
            command_id,
            device,
            command_type,
            payload,
            needs_confirmation,
            self._writes,
            now,
            now + timedelta(seconds=ttl),
            outcome_timeout=outcome_timeout,
            rollout=rollout,
        )

    def pending(self, device: str, now: datetime) -> list[str]:
        """Rule 1: unexpired, undelivered commands of the device, oldest write first."""
        live = [c for c in self.commands.values() if c.device == device and c.is_open()]
        return [c.id for c in sorted(live, key=lambda c: c.written) if now < c.expires]

    def pending_confirmations(self, device: str, now: datetime) -> list[str]:
        return [
            command_id
            for command_id in self.pending(device, now)
            if not self.commands[command_id].ready()
        ]

    def drain(self, device: str, now: datetime) -> list[bytes]:
        """Rule 2: ready, unexpired, undelivered commands in the order they became ready."""
        ready = [
            self.commands[command_id]
            for command_id in self.pending(device, now)
            if self.commands[command_id].ready()
        ]
        ready.sort(key=lambda c: (c.became_ready(), c.written))
        for command in ready:
            command.finish("delivered", now)
        return [command.payload for command in ready]

    def confirm(self, command_id: str, now: datetime) -> type[Exception] | None:
        """Rule 4 (and 3: a superseded command cannot be confirmed)."""
        command = self.commands.get(command_id)
        if command is None or command.outcome in ("cancelled", "superseded"):
            return CommandNotFound
        if command.outcome == "delivered":
            return None
        if command.expired(now):
            return CommandExpired
        if command.needs_confirmation and command.confirmed_at is None:
            command.confirmed_at = now
        return None

    def cancel(self, command_id: str, now: datetime) -> type[Exception] | None:
        """Rule 5: only an undelivered, unfinished, unexpired command can be cancelled."""
        command = self.commands.get(command_id)
        if command is None or not command.is_open() or command.expired(now):
            return CommandNotFound
        command.finish("cancelled", now)
        return None

    def cleanup(self, now: datetime) -> int:
        """Rule 6: ends the expired commands, counts them, prunes old finished ones; rule 9:
        a delivered command silent past its deadline ends timed out."""
        expired = [c for c in self.commands.values() if c.is_open() and now >= c.expires]
        for command in expired:
            command.finish("expired", now)
        for command in self.commands.values():
            if self._waits_for_report(command):
                assert command.finished_at is not None
                assert command.outcome_timeout is not None
                if command.finished_at + timedelta(seconds=command.outcome_timeout) <= now:
                    command.report = (CommandStatus.TIMED_OUT, None, None)
                    command.reported_at = now
        for command_id, command in list(self.commands.items()):
            if self._waits_for_report(command):
                continue
            final = command.reported_at or command.finished_at
            if final is not None and final < now - self.retention:
                del self.commands[command_id]
        return len(expired)

    @staticmethod
    def _waits_for_report(command: Command) -> bool:
        return (
            command.outcome == "delivered"
            and command.report is None
            and command.outcome_timeout is not None
        )

    def report(self, command_id: str, report: Report, now: datetime) -> type[Exception] | None:
        """Rule 9: only a delivered command takes a report; the same one again is harmless."""
        command = self.commands.get(command_id)
        if command is None:
            return CommandNotFound
        if command.outcome != "delivered":
            return OutcomeRejected
        if command.report is not None:
            return None if command.report == report else OutcomeRejected
        command.report, command.reported_at = report, now
        return None

    def members(self, rollout: str) -> list[Command]:
        return [c for c in self.commands.values() if c.rollout == rollout]

    def confirm_rollout(self, rollout: str, now: datetime) -> int | type[Exception]:
        members = self.members(rollout)
        if not members:
            return RolloutNotFound
        waiting = [
            c
            for c in members
            if c.is_open() and now < c.expires and c.needs_confirmation and c.confirmed_at is None
        ]
        for command in waiting:
            command.confirmed_at = now
        return len(waiting)

    def cancel_rollout(self, rollout: str, now: datetime) -> int | type[Exception]:
        members = self.members(rollout)
        if not members:
            return RolloutNotFound
        live = [c for c in members if c.is_open() and now < c.expires]
        for command in live:
            command.finish("cancelled", now)
        return len(live)

    def summary(self, rollout: str, now: datetime) -> dict[CommandStatus, int] | type[Exception]:
        members = self.members(rollout)
        if not members:
            return RolloutNotFound
        counts = dict.fromkeys(CommandStatus, 0)
        for command in members:
            status = self.status(command.id, now)
            assert isinstance(status, CommandStatus)
            counts[status] += 1
        return counts

    def status(self, command_id: str, now: datetime) -> CommandStatus | type[Exception]:
        """Rule 8."""
        command = self.commands.get(command_id)
        if command is None:
            return CommandNotFound
        if command.report is not None:
            return command.report[0]
        if command.outcome is not None:
            return CommandStatus(command.outcome)
        if now >= command.expires:
            return CommandStatus.EXPIRED
        if not command.ready():
            return CommandStatus.AWAITING_CONFIRMATION
        return CommandStatus.PENDING
