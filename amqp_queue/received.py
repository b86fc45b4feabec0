"""What ``consume`` hands a gateway: the command, and a way to report how it went."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from amqp_queue.state.model import PendingCommand


@dataclass(frozen=True, slots=True)
class OutcomeReporter:
    """How a :class:`ReceivedCommand` reports: the store's own calls, not public ones, since
    they take the command as received (a stream handed it out) without asking the index."""

    complete: Callable[[str, bytes | None], Awaitable[None]]
    fail: Callable[[str, str], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedCommand(PendingCommand):
    """A :class:`PendingCommand` from ``consume``, with the outcome report of rule 9.

    ``await command.complete(result)`` or ``await command.fail(reason)`` may be called in
    the loop body or after it: a report is proof that the device took the command, so a
    command still being handed out is marked delivered first (its message is acked with the
    next one, as usual; should the body raise after the report, the repeat is dropped).
    """

    reporter: OutcomeReporter = field(repr=False, compare=False)

    async def complete(self, result: bytes | None = None) -> None:
        """Reports ``SUCCEEDED`` with an optional result; see ``complete_command``."""
        await self.reporter.complete(self.id, result)

    async def fail(self, reason: str) -> None:
        """Reports ``FAILED`` with a reason; see ``fail_command``."""
        await self.reporter.fail(self.id, reason)
