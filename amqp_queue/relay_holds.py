"""What the commands an outbox relay owes wait behind, so no device's commands are reordered.

Two kinds of another writer's unpublished commands come before this process's own:

- those the relay's first read found not yet due (their writer, maybe this process before a
  restart, may still publish them): what this process owes to the same device waits until
  each is published, or for :data:`WRITER_GRACE` at most, after which this relay publishes
  them ahead of it (their writer likely died; a copy of one it did publish is dropped at
  delivery);
- orphans (past their writer's lease) that another relay holds the lease to sweep, but does
  not (it died holding it): until the lease lapses, this process publishes nothing directly
  to their devices, so what it owes to such a device goes out with its orphans ahead of it.

Callers wait for what they are owed (:class:`PublishWaits`): a call that returned before a
later call in another process began must not be published after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from amqp_queue.state.model import CommandRecord

logger = logging.getLogger("amqp_queue.outbox")

# Seconds between looks at a direct publish a give-back waits for (see land_marks).
_IN_FLIGHT_POLL = 0.01

WRITER_GRACE = 1.0
"""Seconds a command found unpublished at start-up has, from this relay's first read, for
its writer to mark it published while this process owes a command behind it: a live writer
marks within moments; past that it likely died, and this relay publishes the command ahead of
what it owes (a live writer slower than that leaves a copy, dropped at delivery)."""


class StartHolds:
    """The commands the relay's first read found unpublished and not yet due, and the owed
    commands of their devices held back behind them."""

    def __init__(self) -> None:
        self.found: dict[str, tuple[str, datetime]] = {}
        """By id: device and ready time."""
        self._started_at: datetime | None = None
        self._started_seen = 0.0
        """The event loop's time of the first read: every found command was unpublished then,
        so its writer's grace runs from then, however many full reads later this relay
        reached it (counted from each read, Y behind 8 found commands read 2 at a time waited
        four graces, longer than its call)."""
        self.held_back: set[str] = set()
        self.orphan_devices: set[str] = set()
        """The devices of orphans the last read found and this relay may not sweep (another
        relay holds the lease), owing nothing to them."""

    @property
    def holding(self) -> bool:
        return bool(self.found or self.held_back)

    def hold_back(
        self,
        young: dict[str, CommandRecord],
        due: dict[str, CommandRecord],
        horizon: datetime | None,
        now: datetime,
        unread: set[str],
    ) -> None:
        """Keeps this process's commands behind what it found unpublished when it started,
        including what a full read (``horizon``: the ready time of its last) left unread:
        removes them from ``due``.

        The commands the first read finds, not yet past their writer's lease, may be this
        process's own from before a restart (it died between write and publish), and
        nobody publishes them until the lease runs out. Until each is published or due,
        what this process owes to the same device waits (``pending`` stays set, so new
        commands are owed too): published now, it would overtake them. Owed commands a full
        read left ``unread`` wait too. Found commands past :data:`WRITER_GRACE` ahead of
        what waits are published by this relay.
        """
        seen = asyncio.get_running_loop().time()
        if self._started_at is None:
            self._started_at, self._started_seen = now, seen
        # Gone from the read: published, ended or due; unless beyond a full read's end.
        self.found = {
            command_id: entry
            for command_id, entry in self.found.items()
            if command_id in young or (horizon is not None and entry[1] > horizon)
        }
        # Found now, but ready before the first read: a full first read left it unread.
        for command_id, record in young.items():
            if record.ready_at <= self._started_at and command_id not in self.found:
                self.found[command_id] = (record.device_id, record.ready_at)
        self.held_back = self._behind_found(due)
        if self.held_back or unread:
            # Owed commands past a full read's end may be any device's: all it found goes.
            moved = self._publish_found(young, due, seen, every_device=bool(unread))
            # Ahead of what is still found on their devices, the moved ones go out now.
            self.held_back = self._behind_found(due) - moved
        for command_id in self.held_back:
            del due[command_id]
        self.held_back |= unread

    def _behind_found(self, due: dict[str, CommandRecord]) -> set[str]:
        devices = {device for device, _ in self.found.values()}
        return {command_id for command_id, record in due.items() if record.device_id in devices}

    def _publish_found(
        self,
        young: dict[str, CommandRecord],
        due: dict[str, CommandRecord],
        now: float,
        *,
        every_device: bool,
    ) -> set[str]:
        """Moves to ``due`` the found commands past the writer's grace (at ``now``, the event
        loop's time) of the devices this process owes to, or of every device; returns their
        ids. A caller waits for its command, and it must not return before its command is
        published (a call another process begins then would overtake it), nor wait out their
        lease. A copy of one the writer did publish is dropped at delivery."""
        owing = {due[command_id].device_id for command_id in self.held_back}
        moved: set[str] = set()
        if now - self._started_seen < WRITER_GRACE:
            return set()
        for command_id, (device, _) in list(self.found.items()):
            if (every_device or device in owing) and command_id in young:
                due[command_id] = young[command_id]
                del self.found[command_id]
                moved.add(command_id)
        return moved


@dataclass(eq=False)
class _Waiter:
    """A caller waiting for its command (see :class:`PublishWaits`)."""

    since: int
    """The number of the last pass begun when it began waiting (``sys.maxsize``: through
    failed passes)."""
    done: asyncio.Future[None]
    timeout: asyncio.Timeout | None = None


class PublishWaits:
    """Callers waiting until the relay no longer owes their command (published, ended, or
    found published elsewhere)."""

    def __init__(self) -> None:
        # Each caller with the number of the last pass begun when it began waiting.
        self._waiting: dict[str, list[_Waiter]] = {}
        self._passes = 0

    def new_pass(self) -> int:
        """Counts a pass beginning; returns its number (see :meth:`failed`)."""
        self._passes += 1
        return self._passes

    async def wait(self, command_id: str, within: float, *, through_failures: bool = False) -> None:
        """Returns once :meth:`settle` says the command is no longer owed, a pass begun
        after this call failed (unless ``through_failures``), or after ``within`` seconds
        (it stays owed: published by a later pass)."""
        done = asyncio.get_running_loop().create_future()
        waiter = _Waiter(sys.maxsize if through_failures else self._passes, done)
        self._waiting.setdefault(command_id, []).append(waiter)
        try:
            async with asyncio.timeout(within) as waiter.timeout:
                await done
        except TimeoutError:
            pass
        finally:
            waiting = self._waiting.get(command_id, [])
            if waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del self._waiting[command_id]

    def settle(self, owed: Collection[str], *, before: int | None = None) -> None:
        """Wakes the callers of commands not in ``owed`` (only those that began waiting
        before pass ``before`` began, when it is given)."""
        for command_id in list(self._waiting):
            if command_id in owed:
                continue
            waiting = self._waiting.pop(command_id)
            for waiter in waiting:
                if before is not None and waiter.since >= before:
                    self._waiting.setdefault(command_id, []).append(waiter)
                elif not waiter.done.done():
                    waiter.done.set_result(None)

    def failed(self, number: int, *, cut_to: float | None = None) -> None:
        """Wakes the callers that began waiting before pass ``number``, which failed: those
        that began during it wait for the next try, which they kicked (the broker
        or the index may be back by then).

        ``cut_to``: the pass failed on the broker, and the callers that began waiting during
        it wait that many seconds more at most, through the tries that fail, as a call begun
        now does (see ``OutboxRelay.published``). Their wait was decided when it began,
        before the relay knew the broker failing: on a stalled link each would otherwise wait
        ``publish_timeout``, however soon after it began the relay knew.
        """
        self.settle((), before=number)
        if cut_to is None:
            return
        deadline = asyncio.get_running_loop().time() + cut_to
        for waiting in self._waiting.values():
            for waiter in waiting:
                waiter.since = sys.maxsize
                timeout = waiter.timeout
                if timeout is None or timeout.expired():
                    continue
                when = timeout.when()
                if when is None or when > deadline:
                    timeout.reschedule(deadline)

    def end(self) -> None:
        """Wakes every caller (the relay is closing)."""
        self.settle(())


async def land_marks(
    flush: Callable[[], Awaitable[None]],
    in_flight: Collection[str],
    command_ids: Collection[str],
    within: float,
) -> None:
    """Commits this process's publish marks (``flush``), after the direct publishes of
    ``command_ids`` under way (``in_flight`` until their marks land), for ``within`` seconds
    at most. Before a command is given back unpublished: a mark landing later would say
    published a command whose message is gone, and nobody would publish it again."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while True:
                await flush()
                if not any(command_id in in_flight for command_id in command_ids):
                    return
                await asyncio.sleep(_IN_FLIGHT_POLL)  # its confirm, then its mark
    logger.warning("giving back commands whose publish marks have not landed yet")
