"""A small reference model of the rules in docs/design.md, written from the text, not from the code.

It deliberately shares nothing with ``state.rules``: every backend is compared with it step by
step, so a rule misread in one place shows up as a disagreement instead of being copied.

Interpretations where docs/design.md leaves room (each one also what a careful reader would pick):

- A command is expired from the instant ``now >= created + ttl``.
- An expired command stays "open" until ``cleanup`` (or a replacement of its type) notices it;
  it finishes then, and the retention of rule 6 counts from then.
- Confirming or cancelling a command that needs no confirmation, or confirming one that was
  delivered, is harmless (confirm) or "already delivered" (cancel).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from amqp_queue.state import CommandExpired, CommandNotFound, CommandStatus

Outcome = str  # "delivered" | "cancelled" | "superseded" | "expired"


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

    def __init__(self, retention: timedelta) -> None:
        self.retention = retention
        self.commands: dict[str, Command] = {}
        self._writes = 0

    def enqueue(
        self,
        command_id: str,
        device: str,
        command_type: str | None,
        payload: bytes,
        ttl: float,
        needs_confirmation: bool,
        now: datetime,
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
        """Rule 6: ends the expired commands, counts them, prunes old finished ones."""
        expired = [c for c in self.commands.values() if c.is_open() and now >= c.expires]
        for command in expired:
            command.finish("expired", now)
        for command_id, command in list(self.commands.items()):
            if command.finished_at is not None and command.finished_at < now - self.retention:
                del self.commands[command_id]
        return len(expired)

    def status(self, command_id: str, now: datetime) -> CommandStatus | type[Exception]:
        """Rule 8."""
        command = self.commands.get(command_id)
        if command is None:
            return CommandNotFound
        if command.outcome is not None:
            return CommandStatus(command.outcome)
        if now >= command.expires:
            return CommandStatus.EXPIRED
        if not command.ready():
            return CommandStatus.AWAITING_CONFIRMATION
        return CommandStatus.PENDING
