"""Ready order on quorum queues, where a requeued message goes to the back of the queue.

A classic queue puts a requeued message back at its place; a quorum queue (RabbitMQ 3.10 here)
puts it behind every message queued since. A stream that closes with prefetched commands, or
whose loop body raised, gives them back that way, and the next consumer would meet the newer
commands first. So on quorum queues a stream hands out in the index's ready order: before
handing out a command it checks that every older ready command of the device, still
open in the index, is in its hands (or was handed out); while one is missing it reads more of
the queue, for at most :data:`WAIT` seconds of waiting on the broker, and then goes on
without it (it may be in another consumer's hands, or beyond a full prefetch window, or
unpublished: its writer died). The index's time to mark and check does not count: a loaded
index is not a missing command.

"Published" is not read from the index: a publish mark rides along with a later write
(:data:`~amqp_queue.publish_path.MARK_LINGER`), so a command in the queue may not be marked
yet. Commands are published in ready order, so an older ready command is in the queue or
about to be, unless its writer died before publishing it (then the wait runs out once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.state import rules
from amqp_queue.state.model import CommandRecord

logger = logging.getLogger("amqp_queue.stream")

T = TypeVar("T")

WAIT = 0.5
"""Seconds a quorum-queue stream reads on for an older command before it goes on without."""


class ReadyOrder:
    """The device's ready, open commands in ready order, as the index last said, and how
    long each older one has been waited for."""

    def __init__(self, state: DeliveryIndex, device_id: str) -> None:
        self._state = state
        self._device_id = device_id
        self._expected: list[str] = []
        # Seconds spent reading the broker while each older command was missing.
        self._waited_for: dict[str, float] = {}
        # Waited for longer than WAIT: not waited for again.
        self._given_up: set[str] = set()
        # Per set of missing commands: how many more times a full window may go back.
        self._rotations: dict[frozenset[str], int] = {}
        self.waited = False
        """Whether the stream read on for a missing command since its last hand-out: the
        next one is checked against the index again before it goes out."""
        self.stale = False
        """Whether a window came since the last read (:meth:`refresh`) ended: read again
        before anything is handed out (a read cut short left the order unknown)."""

    async def refresh(self, held: Collection[str]) -> set[str]:
        """Reads the device's open commands again (after a window came). Returns those of
        ``held``, found live before the read, that have ended since (a cancel returned
        meanwhile): not to be handed out. Those the read no longer lists are asked about
        again with the liveness query, the one the settlement rule acks by."""
        now = self._state.clock()
        records = await self._state.open_commands(self._device_id)
        self._expected = [
            record.id
            for record in rules.in_ready_order(records)
            if rules.is_deliverable(record, now)
        ]
        listed = set(self._expected)
        unlisted = [command_id for command_id in held if command_id not in listed]
        live = await self._state.deliverable(unlisted) if unlisted else {}
        self.stale = False
        return {command_id for command_id in unlisted if command_id not in live}

    def missing_before(
        self, record: CommandRecord, present: Collection[Collection[str]]
    ) -> list[str]:
        """The older ready commands of the device in none of the ``present`` ids (in
        hand, handed out): handing ``record`` out now would overtake them. Those waited for
        (:meth:`read_on`) for :data:`WAIT` are given up on."""
        missing: list[str] = []
        for command_id in self._expected:
            if command_id == record.id:
                break
            if command_id in self._given_up or any(command_id in ids for ids in present):
                continue
            missing.append(command_id)
        else:
            # Not in the last read (it came after it): nothing known to be older.
            return []
        overdue = [
            command_id for command_id in missing if self._waited_for.get(command_id, 0.0) >= WAIT
        ]
        if overdue:
            logger.info(
                "consumer of %s goes on without %d older commands that did not arrive",
                self._device_id,
                len(overdue),
            )
            self._given_up.update(overdue)
        return [command_id for command_id in missing if command_id not in self._given_up]

    async def read_on(
        self, missing: Collection[str], next_window: Callable[[float], Awaitable[T]]
    ) -> T:
        """The next window, read for what is left of :data:`WAIT` for the ``missing``
        command waited for longest; the time it takes counts as waiting for each of them."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        waited = max((self._waited_for.get(command_id, 0.0) for command_id in missing), default=0.0)
        try:
            return await next_window(max(0.0, WAIT - waited))
        finally:
            for command_id in missing:
                waited = self._waited_for.get(command_id, 0.0)
                self._waited_for[command_id] = waited + loop.time() - started

    async def may_rotate(
        self, missing: Collection[str], queued: Callable[[], Awaitable[int]], window: int
    ) -> bool:
        """Whether a full window may go back once more for these missing commands: as often
        as it takes to come round the queue once (``queued()`` messages behind it, asked the
        first time), not for ever: a missing one in another consumer's hands would have the
        same messages go round and round, each turn a redelivery."""
        key = frozenset(missing)
        if key not in self._rotations:
            self._rotations[key] = await queued() // window + 1
        self._rotations[key] -= 1
        return self._rotations[key] >= 0
