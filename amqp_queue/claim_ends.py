"""The ends of redelivered commands' claims a stream asks the index for, each asked once.

A ``consume()`` window holding the redelivered message of a command that is not live asks the
index to end the claims on it before it drops it (see :func:`amqp_queue.settlement.split_live`).
That is a write. Cut half way by a poll's deadline it spoils its connection, and a gateway
polling with 1 ms deadlines on PostgreSQL asked it again at every poll, on a new connection,
cut again, and was handed nothing more (tests/test_poll_past_ended_redelivery.py). Here an end
cut by its caller runs on by itself, and the next poll waits for it instead of asking again.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Collection

from amqp_queue.delivery_index import DeliveryIndex

CLOSE_WAIT = 1.0
"""Seconds a closing stream waits for its asks under way (a healthy index ends one in
milliseconds) before it cancels them."""


class ClaimEnds:
    """One stream's asks to end claims, kept until the window they were for is admitted (and
    held here while they run: the event loop holds tasks weakly), and waited for or cancelled
    as the stream closes (:meth:`close`)."""

    def __init__(self, state: DeliveryIndex) -> None:
        self._state = state
        self._asked: dict[str, asyncio.Task[int]] = {}

    async def end_claims(self, command_ids: Collection[str]) -> int:
        """Ends the claims on these commands (:meth:`DeliveryIndex.end_claims`), not asking
        again for those asked already; how many claims the asks ended. An ask that failed is
        asked again the next time."""
        new = [command_id for command_id in command_ids if command_id not in self._asked]
        if new:
            task = asyncio.ensure_future(self._state.end_claims(new))
            task.add_done_callback(functools.partial(self._ended, new))
            for command_id in new:
                self._asked[command_id] = task
        asks = {self._asked[command_id] for command_id in command_ids}
        await asyncio.wait(asks)  # a cut caller leaves them running
        if any(ask.cancelled() for ask in asks):
            # Cancelled by the stream's close from another task, not this caller's cut: the
            # caller finds the stream closed and ends as any loop of a closed stream does.
            return 0
        return sum(ask.result() for ask in asks)

    def forget(self) -> None:
        """Forgets the asks that ended: their window was admitted, and a later redelivery of
        one of these commands is a new one to ask about."""
        self._asked = {key: task for key, task in self._asked.items() if not task.done()}

    async def close(self) -> None:
        """Waits for the asks under way, :data:`CLOSE_WAIT` at most, then cancels the rest
        and waits for them as long again: a closing stream's store may close its index next.
        A write an ask began runs on to its end, bounded by the index (on PostgreSQL
        ``CUT_WRITE_WAIT``); the store's close waits for its index connections in turn."""
        running = {task for task in self._asked.values() if not task.done()}
        if running:
            _, late = await asyncio.wait(running, timeout=CLOSE_WAIT)
            self.cancel()
            if late:
                await asyncio.wait(late, timeout=CLOSE_WAIT)
        self._asked = {}

    def cancel(self) -> None:
        """Cancels the asks under way (a close cut short); an end of claims is idempotent,
        and the next reader of those messages asks again."""
        for task in self._asked.values():
            task.cancel()
        self._asked = {}

    def _ended(self, command_ids: list[str], task: asyncio.Task[int]) -> None:
        # Read here, so an ask whose caller left logs no "exception was never retrieved";
        # a caller still waiting has it raised all the same.
        if task.cancelled() or task.exception() is not None:
            for command_id in command_ids:
                if self._asked.get(command_id) is task:
                    del self._asked[command_id]
