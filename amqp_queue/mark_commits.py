"""Delivery marks of every stream of a store, committed together.

Each ``consume()`` stream marks what its loop bodies finished in the background, a batch of
its own at a time. With a fleet online through one store (a gateway after an outage: 2,000
streams of 10 commands), those were 4,000 write transactions queued on the index's one
writer, each waiting seconds for its turn, and a closing stream's last marks could outwait
its bound (its commands then come again). One commit carries every stream's marks that
waited meanwhile, as enqueues share theirs (:mod:`amqp_queue.batching`).
"""

from __future__ import annotations

from collections.abc import Collection

from amqp_queue.batching import Batcher
from amqp_queue.delivery_index import DeliveryIndex

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

    async def mark_delivered(self, command_ids: Collection[str]) -> None:
        """Marks these commands delivered; raises what the commit carrying them raised."""
        await self._commits.submit(command_ids)

    async def _commit(self, batches: list[Collection[str]]) -> None:
        await self._state.mark_delivered([command_id for ids in batches for command_id in ids])
