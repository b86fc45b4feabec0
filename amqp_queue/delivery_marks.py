"""What a ``consume`` stream does with a command once its loop body finished: the delivery
mark in the index, then the ack (one frame for several where it may)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aio_pika.abc import AbstractIncomingMessage

from amqp_queue.batching import Batcher
from amqp_queue.claim_ends import ClaimEnds
from amqp_queue.config import RabbitMQConfig
from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.mark_commits import MarkCommits
from amqp_queue.observer import Observer
from amqp_queue.settlement import (
    command_ids,
    report_delivered,
    settle,
    settle_each,
    settles_beside,
    split_live,
)
from amqp_queue.state.model import CommandRecord

logger = logging.getLogger("amqp_queue.stream")

# Marked commands are acked together once they are this share of the prefetch window.
_ACK_SHARE = 4

Finished = tuple[AbstractIncomingMessage, CommandRecord]


class DeliveryMarks:
    """A stream's finished commands: marked delivered in the background (what finishes
    meanwhile shares the write), then acked.

    ``ack_together``: the stream hands out in delivery order, so one multiple ack may settle
    several marked commands (not on quorum queues, which hand out in ready order).
    """

    def __init__(
        self,
        state: DeliveryIndex,
        observer: Observer,
        config: RabbitMQConfig,
        device_id: str,
        *,
        ack_together: bool,
        commits: MarkCommits,
    ) -> None:
        self._state = state
        # The store's: marks of every stream share its commits, and what a closed stream
        # could not land is the store's to land (see owe_unlanded).
        self._commits = commits
        self._claim_ends = ClaimEnds(state)
        self._observer = observer
        self._device_id = device_id
        self._batcher = Batcher(
            self._mark_delivered,
            max_batch=config.prefetch,
            on_detached_failure=self._log_mark_failure,
        )
        self.unmarked: list[Finished] = []
        """Finished commands whose delivery mark failed: unacked, tried again with the next."""
        # Marked commands not acked yet: acked together once they are a share of the window
        # (see _ack_marked), or before the stream waits for the broker or closes.
        self._marked: list[AbstractIncomingMessage] = []
        self._ack_every = max(1, config.prefetch // _ACK_SHARE)
        self._ack_together = ack_together
        # Ids posted whose mark has not run yet (or runs now), and deliveries of them that
        # came again meanwhile: settled by how that mark ends.
        self._posted: set[str] = set()
        self._copies: dict[str, AbstractIncomingMessage] = {}

    def post(self, finished: Finished) -> None:
        """Marks (and acks) a finished command in the background."""
        self._posted.add(finished[1].id)
        self._batcher.post_detached(finished)

    def ack_singly(self) -> None:
        """From now on each command is acked by itself: the stream holds deliveries out of
        tag order (a copy in an earlier one's place, or deliveries of two channels), and one
        multiple ack would take deliveries still in hand, or name only the last channel's."""
        self._ack_together = False

    def adopt(
        self, message: AbstractIncomingMessage, command_id: str
    ) -> AbstractIncomingMessage | None:
        """A new delivery of a command the stream handed out; returns what to drop as stale.

        The broker gives a command again when the channel holding it was lost (and restored).
        While its delivery mark has not landed, the new delivery is the one to keep unacked:
        the lost channel's is gone, and should the mark never land, the command must come
        again (at-least-once). A copy on the same open channel (a repeated publish) is the
        one dropped: the first keeps the command's place in the queue (see
        :func:`~amqp_queue.settlement.settles_beside`). Marked, or never posted here, it is the
        new delivery's due.
        """
        for at, (older, record) in enumerate(self.unmarked):
            if record.id == command_id:
                self.ack_singly()
                if settles_beside(older, message):
                    return message
                self.unmarked[at] = (message, record)
                return older
        if command_id in self._posted:
            self.ack_singly()
            older_copy = self._copies.get(command_id)
            self._copies[command_id] = message
            return older_copy
        return message

    async def split_live(
        self, messages: Sequence[AbstractIncomingMessage]
    ) -> tuple[list[Finished], list[AbstractIncomingMessage]]:
        """``settlement.split_live`` (keeping each command's latest delivery), once the
        store's owed marks among these commands landed: the requeued message of a command a
        closed stream handed out is dropped as delivered, not handed out again."""
        await self._commits.land_owed_among(command_ids(messages))
        split = await split_live(
            self._state, self._device_id, messages, latest=True, revive=self._claim_ends
        )
        self._claim_ends.forget()
        return split

    def owe_unlanded(self) -> None:
        """Hands the store the marks this closing stream has not landed: those that failed,
        and any still running past the close's bound (landing twice does no harm). The
        device has these commands: DELIVERED, also if replaced or cancelled meanwhile."""
        unlanded = [record.id for _, record in self.unmarked] + sorted(self._posted)
        if unlanded:
            self._commits.owe(unlanded)
        self._claim_ends.cancel()  # what flush_within did not wait for: the store closes next

    async def drain(self) -> None:
        """Returns once the marks posted so far have run, failed or not."""
        await self._batcher.drain()

    async def flush_within(self, seconds: float) -> None:
        """:meth:`flush`, for ``seconds`` at most (a closing stream's): an index that
        does not answer (a stalled link) must not hold the close. Marks that did not land
        leave their commands unacked, requeued with the channel: handed out again
        (at-least-once)."""
        try:
            async with asyncio.timeout(seconds):
                await self.flush()
                await self._claim_ends.close()
        except TimeoutError:
            logger.warning(
                "consumer of %s closed before its delivery marks landed: the commands not "
                "marked are requeued and come again",
                self._device_id,
            )

    async def flush(self) -> None:
        """Marks and acks what has finished, before the stream waits for the broker or
        closes."""
        await self.drain()
        if self.unmarked:
            # Before the stream waits for the broker or closes, with nothing new to carry
            # them: the commands whose mark failed get one more try by themselves.
            try:
                await self._mark_delivered([])
            except Exception as exc:  # as the Batcher: kept for the next try, and logged
                self._log_mark_failure(exc)
        # The broker's window is not held while the stream waits for it.
        await self._ack_marked()

    def _log_mark_failure(self, exc: BaseException) -> None:
        logger.warning(
            "marking commands of %s delivered failed (%d waiting to be marked): %s",
            self._device_id,
            len(self.unmarked),
            exc,
        )

    async def _mark_delivered(self, finished: list[Finished]) -> None:
        batch = [*self.unmarked, *finished]
        if not batch:
            return
        self.unmarked = []
        self._posted.update(record.id for _, record in batch)
        try:
            await self._commits.mark_delivered([record.id for _, record in batch])
        except BaseException:
            # The device has them: their status must come to say so, so they are marked
            # again with the next batch. Unacked until then, they come again from the
            # broker should the channel go first (at-least-once). From now on each is acked
            # alone: a batch may then hold deliveries of a channel restored since, and one
            # ack of several deliveries names only the channel of the last.
            self.unmarked, replaced = self._latest(batch)
            self.ack_singly()
            # Stale, but on a live channel (a repeated publish's copy) one holds a place in the
            # prefetch window: acked with the next marked ones, each by itself.
            self._marked.extend(replaced)
            raise
        report_delivered(self._observer, [record for _, record in batch], self._state.clock())
        self._marked.extend(message for message, _ in batch)
        # A copy that came while the mark ran is as delivered as the command: acked too, or
        # it would hold a place in the prefetch window until the channel closes.
        self._marked.extend(
            self._copies.pop(record.id) for _, record in batch if record.id in self._copies
        )
        self._posted.difference_update(record.id for _, record in batch)
        if len(self._marked) >= self._ack_every:
            await self._ack_marked()

    def _latest(
        self, batch: list[Finished]
    ) -> tuple[list[Finished], list[AbstractIncomingMessage]]:
        """The batch with each command's delivery to keep (see :meth:`adopt`: the first while
        its channel can settle it, else the latest), and the others: stale (their channel
        lost, or a copy of a repeated publish)."""
        latest: list[Finished] = []
        replaced: list[AbstractIncomingMessage] = []
        for message, record in batch:
            self._posted.discard(record.id)
            copy = self._copies.pop(record.id, None)
            if copy is None or settles_beside(message, copy):
                latest.append((message, record))
                if copy is not None:
                    replaced.append(copy)
            else:
                latest.append((copy, record))
                replaced.append(message)
        return latest, replaced

    async def _ack_marked(self) -> None:
        """Acks the commands marked delivered so far.

        Not after each mark: every ack frame lets the broker send as many deliveries, each
        a wake-up of the connection's reader, and with a mark as fast as the next hand-out's
        liveness read the stream acked, and was refilled, one message at a time. Marked
        and not acked yet, a command the broker gives again (the channel lost) is dropped
        as stale: the index no longer holds it as live.
        """
        marked, self._marked = self._marked, []
        if not marked:
            return
        if self._ack_together:
            # Handed out in delivery order, and every earlier delivery on this channel is
            # settled (acked here or as stale, or marked and acked by this frame): one frame
            # acks all.
            await settle(marked[-1], ack=True, multiple=True)
            return
        await settle_each(marked, ack=True)
