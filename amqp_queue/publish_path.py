"""Write first, then publish: the path of every enqueue and confirmation, and who owes what.

A command is durable in the index before anything reaches the broker; concurrent enqueues
share one index transaction (:class:`~amqp_queue.batching.Batcher`), and the publish marks of
earlier commands ride along with it. A direct publish is "in flight" from its start until its
mark is committed, and the outbox relay leaves it alone meanwhile: without a fault each
command is published once. Whatever cannot be published directly (the broker is down, a
backlog is waiting, the caller was cancelled) is owed to the relay at once, which publishes
in ready order, so nothing overtakes it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from datetime import datetime
from typing import TypeVar

from amqp_queue.batching import Batcher, Refusals
from amqp_queue.cut_calls import despite_the_cut, landed, unread_failure, until_landed
from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.errors import BrokerError, CommandRejected, QueueMismatch, closed_under_the_call
from amqp_queue.observer import Observer
from amqp_queue.outbox import OutboxRelay
from amqp_queue.publisher import Publisher
from amqp_queue.state.errors import QueueFull, StateError
from amqp_queue.state.model import CommandRecord

logger = logging.getLogger("amqp_queue.publish_path")

T = TypeVar("T")

# Commands (and publish marks) per index transaction.
_WRITE_BATCH = 500

CANCELLED_WRITE_WAIT = 10.0
"""Seconds a cancelled call waits at most for its index write under way to land (the store
passes its ``publish_timeout``, the bound its calls keep)."""

MARK_LINGER = 0.05
"""Seconds a publish mark waits for the next enqueue's write to ride along with. Marked at
once, each sequential enqueue waited behind the previous one's mark, a commit of its own;
until its mark lands a command stays in flight, which the relay leaves alone."""


class PublishPath:
    """Writes commands to the index and publishes them, or leaves them to the relay.

    Until :meth:`attach` gives it a publisher and a relay (the store has started on its
    broker), every ready command written is owed, and handed to the relay on attach.
    """

    def __init__(
        self,
        state: DeliveryIndex,
        observer: Observer,
        *,
        cancelled_wait: float = CANCELLED_WRITE_WAIT,
    ) -> None:
        self._state = state
        self._observer = observer
        self._cancelled_wait = cancelled_wait
        self._publisher: Publisher | None = None
        self._relay: OutboxRelay | None = None
        self.in_flight: set[str] = set()
        """Direct publishes under way, until their publish marks are committed."""
        # Those of them the broker has not answered yet: a repeated confirm waits for one.
        self._publishing: dict[str, asyncio.Future[bool]] = {}
        self._owed_early: set[str] = set()
        # Index writes take turns: the group commit's and those outside it (write_outside).
        self._turn = asyncio.Lock()
        self._writes: Batcher[CommandRecord | str] = Batcher(
            self._write_batch,
            max_batch=_WRITE_BATCH,
            on_detached_failure=_log_mark_failure,
            linger=MARK_LINGER,
        )

    def attach(self, publisher: Publisher, relay: OutboxRelay) -> None:
        """Publishes from now on; what was owed before goes to ``relay``."""
        self._publisher, self._relay = publisher, relay
        if self._owed_early:
            relay.owe(self._owed_early)
            self._owed_early = set()

    async def write(self, record: CommandRecord) -> None:
        """Writes ``record`` to the index (with whatever else is waiting to be written).

        Cancelled before a transaction took the write, nothing is written. Cancelled after,
        the call raises once the write landed or failed (``cancelled_wait`` at
        most), leaving its command owed to the relay if it landed: run as the write's
        callback, before any later command of the batch is published directly (their callers
        resume after this), so none overtakes it. Landed, it raises once the relay published
        the command (see :mod:`amqp_queue.cut_calls`), so no call begun after it on another
        store does either.
        """
        written = self._writes.post(record)
        try:
            await asyncio.shield(written)
        except asyncio.CancelledError:
            if self._writes.withdraw(written):
                raise  # no transaction has it: nothing is written
            written.add_done_callback(functools.partial(self._owe_if_written, record))
            landing = await until_landed(written, self._cancelled_wait)
            if landing and landed(written) and record.is_ready:
                await self.published_after_a_cut([record.id])
            raise

    async def published_after_a_cut(self, command_ids: Collection[str]) -> None:
        """Waits (``cancelled_wait`` at most) until the relay published the owed commands of
        a call its caller cut short (see :mod:`amqp_queue.cut_calls`)."""
        relay = self._relay
        if relay is not None and command_ids:
            owed = asyncio.gather(*(relay.published(command_id) for command_id in command_ids))
            await despite_the_cut(owed, self._cancelled_wait)

    async def write_outside(
        self,
        writing: Awaitable[T],
        ready_of: Callable[[T], Iterable[CommandRecord]],
        *,
        if_unknown: Iterable[str] = (),
    ) -> T:
        """Awaits an index write made outside the group commit (a fan-out's one transaction,
        a confirmation), which makes ``ready_of(result)`` commands ready.

        It takes its turn with the group commit's writes: one written after it waits until
        it is answered, so no command enqueued later is published ahead of the ones it made
        ready. Cancelled, the caller leaves those commands owed to the relay once the write
        commits (before the next write's turn), and waits for them to be published, as
        :meth:`write` does. Should the write fail
        with the index unable to tell whether it landed, the commands ``if_unknown`` names are
        owed, in turn too (the relay forgets what is not there or not ready).
        """
        abandoned: list[bool] = []
        started: list[bool] = []

        async def in_turn() -> T:
            async with self._turn:
                started.append(True)
                try:
                    result = await writing
                except StateError:
                    for command_id in if_unknown:
                        self.owe(command_id)
                    raise
                if abandoned:
                    self._owe_ready(ready_of(result))
                return result

        written = asyncio.ensure_future(in_turn())
        try:
            return await asyncio.shield(written)
        except asyncio.CancelledError:
            # Its failure, once it ends, is no longer the caller's (nobody reads it).
            written.add_done_callback(unread_failure)
            if not written.done() and not started and inspect.iscoroutine(writing):
                # Still waiting for its turn, its write not begun: taken back, as write()
                # takes back a write no transaction has (nothing lands after the call raised).
                written.cancel()
                writing.close()
                raise
            again = False  # cancelled a second time: raises at once
            if not written.done():
                abandoned.append(True)
                again = not await until_landed(written, self._cancelled_wait)
            elif landed(written):
                self._owe_ready(ready_of(written.result()))
            if landed(written) and not again:
                await self.published_after_a_cut([r.id for r in ready_of(written.result())])
            raise

    def _owe_ready(self, records: Iterable[CommandRecord]) -> None:
        for record in records:
            self.owe(record.id)

    def owe_unstarted(self, records: Iterable[CommandRecord]) -> list[str]:
        """Leaves to the relay those of ``records`` whose direct publish never started (a
        caller cancelled before it reached them), and returns their ids; one under way
        settles itself."""
        unstarted = [record.id for record in records if record.id not in self.in_flight]
        for command_id in unstarted:
            self.owe(command_id)
        return unstarted

    async def publish(self, record: CommandRecord) -> None:
        """Publishes a ready command the index holds, or leaves it to the relay."""
        relay = self._relay
        if (
            self._publisher is None
            or relay is None
            or relay.pending
            or relay.holds(record.device_id)
        ):
            # Not started, or commands the broker has not confirmed yet are waiting:
            # publishing this one directly would overtake them in the device's queue. The
            # relay publishes the backlog in ready order, this one included.
            self.owe(record.id)
            if relay is not None:
                # Returned only once published (as a direct publish does): a call another
                # process starts after this one returned must not overtake it. With the
                # relay failing, its next try (which this owe kicks) decides (see
                # OutboxRelay.published for how long that is waited for).
                try:
                    await relay.published(record.id)
                except asyncio.CancelledError:
                    await self.published_after_a_cut([record.id])
                    raise
            return
        self.in_flight.add(record.id)
        publishing = asyncio.ensure_future(self._publisher.publish(record))
        self._publishing[record.id] = publishing
        publishing.add_done_callback(functools.partial(self._publish_answered, record.id))
        try:
            # Shielded: a cancelled caller leaves the publish to finish by itself. Cut short,
            # it would leave unknown whether the broker has the command (a copy from the
            # relay, or a loss), and a queue declaration cancelled half way closes the
            # channel it runs on.
            await asyncio.shield(publishing)
        except asyncio.CancelledError as exc:
            if not (publishing.cancelled() and closed_under_the_call(exc)):
                publishing.add_done_callback(functools.partial(self._published, record))
                await despite_the_cut(self.published_here(record.id), self._cancelled_wait)
                raise
            # The publish was cancelled, not this caller: settled below, owed to the relay.
        except QueueMismatch as exc:
            # This store's configuration, not the command: a process configured as the
            # device queue is publishes it (its relay, past ``relay_lease``).
            self.in_flight.discard(record.id)
            logger.error("command %s left unpublished: %s", record.id, exc)
            return
        except CommandRejected as exc:
            # Refused for good: no retry makes the broker take it.
            self.in_flight.discard(record.id)
            logger.error("command %s rejected: %s", record.id, exc)
            try:
                await self._state.reject([record.id])
            except StateError as failure:
                # The command is durable and the caller must not retry it: the relay meets
                # the refusal again and ends it then.
                logger.warning("command %s left to the relay to reject: %s", record.id, failure)
                self.owe(record.id)
                return
            self._observer.rejected(record)
            return
        except BrokerError:
            pass
        self._published(record, publishing)

    def _publish_answered(self, command_id: str, publishing: asyncio.Future[bool]) -> None:
        # Not another publish of the same command begun since (a later repeated confirm).
        if self._publishing.get(command_id) is publishing:
            del self._publishing[command_id]

    async def published_here(self, command_id: str) -> None:
        """Waits until this process's publish of a command in flight is answered, and, should
        the broker have failed it, until the relay published it (or gave up for now)."""
        publishing = self._publishing.get(command_id)
        if publishing is not None:
            # Not shielded: wait() leaves the publish alone when this caller is cancelled.
            await asyncio.wait([publishing])
            failure = None if publishing.cancelled() else publishing.exception()
            lost = isinstance(failure, BrokerError) and not isinstance(failure, CommandRejected)
            if publishing.cancelled() or lost:
                # Owed by the first caller too once it resumes, maybe after this one.
                self.owe(command_id)
        if self._relay is not None:
            await self._relay.published(command_id)

    async def published_elsewhere(self, command_ids: Collection[str], within: float) -> set[str]:
        """Waits, for ``within`` seconds at most, until each ready command another call made
        ready (here or in another process) is published or is no longer deliverable; returns
        those still unpublished then. A call that returns once such a command is ready must
        not let a later one overtake it while its publish is still on its way."""
        here = [command_id for command_id in command_ids if command_id in self.in_flight]
        await asyncio.gather(*(self.published_here(command_id) for command_id in here))
        waiting = set(command_ids).difference(here)
        if self._relay is not None:
            relay = self._relay  # each at once unless this process owes it
            await asyncio.gather(*(relay.published(command_id) for command_id in waiting))
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + within, 0.005
        while waiting:
            live = await self._state.deliverable(waiting)
            left = {command_id for command_id, r in live.items() if r.published_at is None}
            if len(left) < len(waiting):
                # Still publishing (a fan-out of thousands takes seconds): not stuck.
                deadline = loop.time() + within
            waiting = left
            if not waiting or loop.time() + pause > deadline:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)
        return waiting

    def owe(self, command_id: str) -> None:
        """Leaves a command to the relay: the attached one, or the one attached later."""
        if self._relay is not None:
            self._relay.owe((command_id,))
        else:
            self._owed_early.add(command_id)

    async def flush(self) -> None:
        """Waits until every write and mark queued so far is committed (or failed)."""
        await self._writes.drain()

    def _owe_if_written(self, record: CommandRecord, written: asyncio.Future[None]) -> None:
        if written.cancelled() or written.exception() is not None:
            return
        if record.is_ready:
            self.owe(record.id)

    def _published(self, record: CommandRecord, publishing: asyncio.Future[bool]) -> None:
        """Settles a direct publish: its mark is queued, or the relay owes the command."""
        failure = None if publishing.cancelled() else publishing.exception()
        if publishing.cancelled() or failure is not None:
            # A refusal for good too: the relay meets it again and rejects the command.
            logger.warning("command %s left to the outbox relay: %s", record.id, failure)
            self.in_flight.discard(record.id)
            self.owe(record.id)
            return
        if not publishing.result():
            self.in_flight.discard(record.id)
            return
        self._observer.published(record, _since(record.ready_at, self._state.clock()))
        # Queued with the writes, the mark rides along with the next enqueue's commit
        # instead of contending with it for the index. The command stays in flight until
        # then, so the relay does not publish it again.
        self._writes.post_detached(record.id)

    async def _write_batch(self, items: Sequence[CommandRecord | str]) -> Refusals:
        async with self._turn:
            return await self._write_in_turn(items)

    async def _write_in_turn(self, items: Sequence[CommandRecord | str]) -> Refusals:
        """One index round trip: new records, and ids of commands the broker confirmed.

        A batch a device's limit refuses (rule 11) is written again one record at a time,
        so only the enqueues that would take their device over it fail (with the refusal).
        """
        records = [item for item in items if isinstance(item, CommandRecord)]
        published = [item for item in items if isinstance(item, str)]
        try:
            superseded = await self._state.write(records, published)
        except QueueFull:
            if len(records) < 2 and not published:
                raise
            # The marks riding along land all the same: lost with the refusal, their
            # commands would be published again by a relay.
            return await self._write_one_by_one(items, published)
        except StateError:
            # The write may have landed though its answer was lost (PostgreSQL says so when
            # it cannot tell): owed, such a command is published before the next one to its
            # device; one that was never written the relay finds missing and forgets.
            for record in records:
                self.owe(record.id)
            raise
        finally:
            # Marked, or the mark failed (the relay then publishes a copy after the lease).
            self.in_flight.difference_update(published)
        if records:
            self._observer.enqueued(records, superseded)
        return None

    async def _write_one_by_one(
        self, items: Sequence[CommandRecord | str], published: list[str]
    ) -> Refusals:
        refused: dict[int, BaseException] = {}
        if published:
            try:
                await self._state.write((), published)
            except StateError as exc:  # the relay publishes them again: a copy, not a loss
                _log_mark_failure(exc)
        for index, item in enumerate(items):
            if not isinstance(item, CommandRecord):
                continue
            try:
                superseded = await self._state.write((item,), ())
            except Exception as exc:  # each record's own fate, this one's only
                if isinstance(exc, StateError):
                    self.owe(item.id)  # it may have landed: as in _write_in_turn
                refused[index] = exc
            else:
                self._observer.enqueued((item,), superseded)
        return refused


def _since(moment: datetime, now: datetime) -> float:
    return max(0.0, (now - moment).total_seconds())


def _log_mark_failure(exc: BaseException) -> None:
    logger.warning("marking commands published failed; the relay will republish: %s", exc)
