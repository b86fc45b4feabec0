"""Hooks through which RabbitMQStore reports what happens to commands (metrics, audit).

The store calls these synchronously on its hot paths, so an implementation must be cheap and
must not raise; :class:`Observer` does nothing and is the default.
"""

from __future__ import annotations

from collections.abc import Sequence

from amqp_queue.state.model import CommandRecord


class Observer:
    """Receives command events; subclass and override what you need."""

    def enqueued(self, records: Sequence[CommandRecord], superseded: int) -> None:
        """Commands were written to the index; ``superseded`` older ones were replaced."""

    def published(self, record: CommandRecord, seconds: float) -> None:
        """The broker confirmed a command, ``seconds`` after it became ready."""

    def delivered(self, records: Sequence[CommandRecord], seconds: Sequence[float]) -> None:
        """Commands were handed to their device, each ``seconds`` after it became ready."""

    def dropped(self, count: int) -> None:
        """Stale messages (superseded, cancelled, expired, already delivered) were dropped."""

    def confirmed(self, record: CommandRecord) -> None:
        """An operator confirmed a command that awaited it (a confirm that changes nothing
        is not reported)."""

    def cancelled(self, record: CommandRecord) -> None:
        """An operator cancelled a command."""

    def expired(self, count: int) -> None:
        """``cleanup`` ended this many expired commands."""

    def rejected(self, record: CommandRecord) -> None:
        """The broker refused a command for good; it ended ``REJECTED``."""

    def outcome(self, record: CommandRecord) -> None:
        """A gateway reported a delivered command's outcome (``record.outcome``)."""

    def timed_out(self, count: int) -> None:
        """``cleanup`` ended this many delivered commands ``TIMED_OUT`` (no outcome came)."""

    def relay_failed(self) -> None:
        """An outbox relay pass failed for an unexpected reason; the relay restarts."""
