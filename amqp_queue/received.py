"""What ``consume`` hands a gateway: the command, and a way to report how it went."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from amqp_queue.state.model import PendingCommand


@dataclass(frozen=True, slots=True)
class OutcomeReporter:
    """What a stream's commands report with: the store's own calls, not public ones, since
    they take a command as received without asking the index. Each command gets them bound
    to its own id (:meth:`bound_to`)."""

    complete: Callable[[str, bytes | None], Awaitable[None]]
    fail: Callable[[str, str], Awaitable[None]]

    def bound_to(self, command_id: str) -> CommandReport:
        return CommandReport(command_id, self)


@dataclass(frozen=True, slots=True)
class CommandReport:
    """The outcome report of the one command a stream handed out, and of no other."""

    command_id: str
    _calls: OutcomeReporter

    async def complete(self, result: bytes | None) -> None:
        await self._calls.complete(self.command_id, result)

    async def fail(self, reason: str) -> None:
        await self._calls.fail(self.command_id, reason)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedCommand(PendingCommand):
    """A :class:`PendingCommand` from ``consume``, with the outcome report of rule 9.

    ``await command.complete(result)`` or ``await command.fail(reason)`` may be called in
    the loop body or after it: a report is proof that the device took the command, so a
    command still being handed out is marked delivered first (its message is acked with the
    next one, as usual; should the body raise after the report, the repeat is dropped). The
    report is bound to the command handed out: a copy made with another id reports for the
    command received.
    """

    reporter: CommandReport = field(repr=False, compare=False)

    async def complete(self, result: bytes | None = None) -> None:
        """Reports ``SUCCEEDED`` with an optional result; see ``complete_command``."""
        await self.reporter.complete(result)

    async def fail(self, reason: str) -> None:
        """Reports ``FAILED`` with a reason; see ``fail_command``."""
        await self.reporter.fail(reason)
