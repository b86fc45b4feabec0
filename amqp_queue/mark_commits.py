"""Delivery marks of every stream of a store, committed together.

Each ``consume()`` stream marks what its loop bodies finished in the background, a batch of
its own at a time. With a fleet online through one store (a gateway after an outage: 2,000
streams of 10 commands), those were 4,000 write transactions queued on the index's one
writer, each waiting seconds for its turn, and a closing stream's last marks could outwait
its bound (its commands then come again). One commit carries every stream's marks that
waited meanwhile, as enqueues share theirs (:mod:`amqp_queue.batching`).

Marks a stream could not land before it closed (the index down) are the store's to land:
the device has those commands, and a mark wins over a replacement, a cancel or an expiry
that came meanwhile (``rules.taken``), so they are tried again in the background until the
index takes them. Left to the requeued messages, a command replaced meanwhile was dropped
as superseded by the next stream and ended SUPERSEDED though the device ran it. A stream or
drain of the store that reads the requeued message of an owed command lands the owed marks
first (:meth:`MarkCommits.land_owed_among`, :meth:`MarkCommits.claim`): it finds the command
DELIVERED rather than handing it out again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Collection

from amqp_queue.batching import Batcher
from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.state.model import CommandRecord

logger = logging.getLogger("amqp_queue.stream")

OWED_RETRY_FIRST = 0.25
"""Seconds before a closed stream's owed marks are tried again; the wait doubles up to
:data:`OWED_RETRY_MOST` while the index keeps failing (as a waiting stream's retries)."""
OWED_RETRY_MOST = 30.0
OWED_PER_COMMIT = 1_000
"""Owed marks landed per commit: after a long outage a whole fleet's, and on Redis one
commit is one script that holds the server while it runs."""
CLOSE_TRY = 1.0
"""Seconds a closing store gives the owed marks' last try at most: one commit where the
index answers, and no more than a second of a close where it does not (a stalled link)."""

# Streams' batches in one commit (the index splits a large one into statements).
_STREAMS_PER_COMMIT = 64


class MarkCommits:
    """``mark_delivered`` for a store's streams: the marks of those that ask while a commit
    is under way go together in the next one; each caller learns that commit's outcome."""

    def __init__(self, state: DeliveryIndex) -> None:
        self._state = state
        self._commits: Batcher[Collection[str]] = Batcher(
            self._commit, max_batch=_STREAMS_PER_COMMIT
        )
        # Marks of closed streams the index has not taken yet (insertion order).
        self._owed: dict[str, None] = {}
        self._landing: asyncio.Task[None] | None = None
        # Set by a commit that landed: the index is back, the owed marks need not wait.
        self._index_back = asyncio.Event()
        self._halted = False  # the store has closed: nothing lands on its index any more

    async def mark_delivered(self, command_ids: Collection[str]) -> None:
        """Marks these commands delivered; raises what the commit carrying them raised."""
        await self._commits.submit(command_ids)

    def owe(self, command_ids: Collection[str]) -> None:
        """Marks a closing stream could not land: tried again in the background until the
        index takes them (a copy the broker hands out before that is at-least-once)."""
        if self._halted:
            # A stream that closed after its store: the broker hands these out again.
            logger.warning(
                "%d delivery marks of a stream closed after its store are lost", len(command_ids)
            )
            return
        self._owed.update(dict.fromkeys(command_ids))
        if self._owed and (self._landing is None or self._landing.done()):
            self._landing = asyncio.create_task(self._land_owed(), name="amqp_queue.owed_marks")

    async def _land_owed(self) -> None:
        loop = asyncio.get_running_loop()
        wait, tried = OWED_RETRY_FIRST, loop.time() - OWED_RETRY_FIRST
        while self._owed:
            self._index_back.clear()
            # Woken early by another stream's mark that landed: a new stream reading the
            # requeued commands before these land hands them out again.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._index_back.wait()
            # But not once per other commit while the index refuses these: one try per
            # OWED_RETRY_FIRST at most.
            await asyncio.sleep(tried + OWED_RETRY_FIRST - loop.time())
            tried = loop.time()
            landed = await self._try_owed_logged()
            wait = OWED_RETRY_FIRST if landed else min(wait * 2, OWED_RETRY_MOST)

    async def land_owed_among(self, command_ids: Collection[str]) -> None:
        """Lands the owed marks now if any of ``command_ids`` is owed one: a requeued
        message of a command a closed stream handed out, which a stream or drain is about to
        ask the index about. Raises what the index raised (the caller keeps the messages, as
        for any index failure)."""
        # Those only: every stream of a fleet back after an outage reads its owed commands
        # at once, and each landing the whole of what is owed was the same thousands of
        # marks once per stream, in commits of 64 streams' batches.
        among = [
            command_id for command_id in dict.fromkeys(command_ids) if command_id in self._owed
        ]
        if among:
            await self.mark_delivered(among)
            for command_id in among:
                self._owed.pop(command_id, None)

    async def claim(self, device_id: str, command_ids: Collection[str]) -> list[CommandRecord]:
        """A drain's claim, after the owed marks among ``command_ids`` landed."""
        await self.land_owed_among(command_ids)
        return await self._state.claim(device_id, command_ids)

    async def _try_owed_logged(self) -> bool:
        try:
            await self._try_owed()
        except Exception as exc:  # kept for the next try, and logged
            logger.warning(
                "marking %d commands of closed streams delivered failed: %s", len(self._owed), exc
            )
            return False
        return True

    async def _try_owed(self) -> None:
        while self._owed:
            owed = list(itertools.islice(self._owed, OWED_PER_COMMIT))
            await self.mark_delivered(owed)
            for command_id in owed:
                self._owed.pop(command_id, None)
            logger.info("marked %d commands of closed streams delivered", len(owed))

    def halt(self) -> None:
        """Stops the background tries (the index is about to close)."""
        self._halted = True
        if self._landing is not None:
            self._landing.cancel()
            self._landing = None

    async def close(self, within: float) -> None:
        """Stops the background tries, and tries what is still owed once more, for
        ``within`` (or :data:`CLOSE_TRY`) seconds at most: left unmarked, those commands
        come again."""
        self.halt()
        if self._owed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(within, CLOSE_TRY)):
                    await self._try_owed_logged()
            if self._owed:
                logger.warning("%d delivery marks left unlanded at close", len(self._owed))

    async def _commit(self, batches: list[Collection[str]]) -> None:
        await self._state.mark_delivered([command_id for ids in batches for command_id in ids])
        self._index_back.set()
