"""The outbox relay: publishes ready commands the broker has not confirmed yet.

A command is written to the state index first and published after. When the publish fails
(broker down, connection cut, confirm timed out) the command stays in the index with no
``published_at``; the relay publishes it once the broker is back: at start-up, when the
connection is restored, when a publish fails, and every ``relay_interval`` seconds.
Without a fault a command is published once (see :class:`OutboxRelay`). A publish whose
confirm was lost may be published twice; the copy is dropped at delivery, because only a
live command id is ever handed to a device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from datetime import datetime, timedelta

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from amqp_queue import retry_log
from amqp_queue.config import RabbitMQConfig
from amqp_queue.delivery_index import DeliveryIndex
from amqp_queue.errors import BrokerError, CommandRejected, QueueMismatch
from amqp_queue.foreign_queues import ForeignQueues
from amqp_queue.observer import Observer
from amqp_queue.owed_releases import OwedReleases
from amqp_queue.publisher import Publisher
from amqp_queue.relay_holds import WRITER_GRACE, PublishWaits, StartHolds, land_marks
from amqp_queue.relay_lease import RelayLease
from amqp_queue.state import rules
from amqp_queue.state.errors import StateError
from amqp_queue.state.model import CommandRecord

logger = logging.getLogger("amqp_queue.outbox")

_RESTART_PAUSE = 1.0  # seconds the relay pauses after a pass failed for an unexpected reason
_START_RECHECK = 0.1  # seconds between passes while commands wait behind the start-up read
BROKER_RETRY_WAIT = 0.25  # seconds a call waits for its publish after a broker failure


class OutboxRelay:
    """Publishes unpublished ready commands, retrying with backoff until the broker is back.

    Without a fault each command is published once. A pass publishes:

    - the commands this process owes (:meth:`owe`): a direct publish failed, was left behind
      the backlog, or its enqueue was cancelled; at once, whatever their age;
    - any other unpublished command (an orphan) only once it is ``config.relay_lease``
      seconds past ready: until then its writer (another process, or this one before a
      restart) may still be publishing it; and only while this relay holds the index's
      relay lease (:meth:`~amqp_queue.delivery_index.DeliveryIndex.hold_relay`), so with
      several processes on one index each orphan is published once; except those found
      at this relay's start that hold back a command it owes, published a second after it
      first saw them (:data:`~amqp_queue.relay_holds.WRITER_GRACE`);

    and never a command of ``in_flight`` (this process's direct publishes, until their
    publish marks are committed). What waits behind what: see :mod:`amqp_queue.relay_holds`.

    Args:
        in_flight: ids whose direct publish is under way here; the store keeps it.
        observer: told when a pass fails for an unexpected reason (see :meth:`_run`).
        land_marks: commits the publish marks waiting to ride along with a write.
    """

    def __init__(
        self,
        state: DeliveryIndex,
        publisher: Publisher,
        config: RabbitMQConfig,
        *,
        in_flight: Collection[str] = frozenset(),
        observer: Observer | None = None,
        land_marks: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._land_marks = land_marks
        self._state = state
        self._publisher = publisher
        self._config = config
        self._in_flight = in_flight
        self._observer = observer or Observer()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._owed: set[str] = set()
        self._owed_release = OwedReleases()
        self._closed = False
        self._next_due: datetime | None = None
        self.pending = True
        """Whether this process owes, or may hold, unpublished commands (so none is direct)."""
        self._kicks = 0
        self._lease = RelayLease(state, config)
        self._holds = StartHolds()
        self._foreign = ForeignQueues()
        self._waits = PublishWaits()
        # What failed the last pass; None once one succeeded (or the connection came back).
        self.failed_on: type[BrokerError] | type[StateError] | None = None

    @property
    def owes(self) -> int:
        """How many commands this process owes the broker (held back ones included)."""
        return len(self._owed)

    def broker_back(self) -> None:
        """The connection came back: a broker failure is over, and a pass goes now."""
        if self.failed_on is BrokerError:
            self.failed_on = None
        self.kick()

    def kick(self) -> None:
        """Asks for a pass soon (a publish failed, the link is back, a command left behind)."""
        self.pending = True
        self._kicks += 1
        self._wake.set()

    def owe(self, command_ids: Iterable[str]) -> None:
        """Takes these commands on: published by the next pass, in ready order."""
        self._owed.update(command_ids)
        self.kick()

    async def land_marks(self, command_ids: Collection[str] = ()) -> None:
        """See :func:`~amqp_queue.relay_holds.land_marks`."""
        if self._land_marks is not None:
            within = self._config.publish_timeout
            await land_marks(self._land_marks, self._in_flight, command_ids, within)

    async def _release_owed(self, *, within: float = 0.0) -> bool:
        """Gives back what :meth:`owe_release` took on, to be published again; False while
        the index refuses (tried again next pass, without holding up the rest)."""
        if self._owed_release:
            await self.land_marks()
        released = await self._owed_release.release(self._state, within=within)
        if released is not None:
            self._owed |= released
        return released is not None

    def owe_release(self, claimed: Iterable[CommandRecord]) -> None:
        """Takes on claimed commands nobody received (a cancelled drain's give-back failed):
        each pass tries to release them, then publishes them again (dropped as delivered)."""
        self._owed_release.add(claimed)
        if self._closed:
            logger.error(
                "the outbox relay is closed: %d claimed commands stay delivered to nobody",
                len(self._owed_release),
            )
        self.kick()

    def _settled(self, kicks_before_read: int) -> bool:
        """Ends a flush unless a kick came after the pass's last read began (its command,
        committed too late for that read, would be overtaken by a direct publish), and clears
        ``pending`` unless commands are held back (:meth:`StartHolds.hold_back`)."""
        if self._kicks != kicks_before_read or self._owed - self._holds.held_back:
            return False
        # Commands still to be given back (see owe_release) go before newer ones too.
        self.pending = self._holds.holding or bool(self._owed_release)
        return True

    async def published(self, command_id: str) -> None:
        """Waits until this relay no longer owes the command (published, ended, or published
        elsewhere): ``publish_timeout`` at most, after a found writer's grace (``WRITER_GRACE``);
        after a broker failure :data:`BROKER_RETRY_WAIT` (a link back publishes it within
        moments, a stalled one would hold each call that long)."""
        if command_id in self._owed and not self._closed:
            grace = WRITER_GRACE if self._holds.found else 0.0
            within, broker_failed = grace + self._config.publish_timeout, False
            if self.failed_on is BrokerError:  # through failed tries: a reconnect is quick
                within, broker_failed = min(within, BROKER_RETRY_WAIT), True
            await self._waits.wait(command_id, within, through_failures=broker_failed)

    def holds(self, device_id: str) -> bool:
        """Whether a command to the device must go through the relay, behind the device's
        orphans that another relay holds the lease to publish (it may have died)."""
        return device_id in self._holds.orphan_devices

    async def flush(self) -> int:
        """Publishes every due unpublished command now; returns how many were published.

        Raises:
            BrokerError: a publish failed; what was published before it stays published.
            StateError: the index could not be read or updated.
        """
        async with self._lock:
            self._lease.new_flush()
            number = self._waits.new_pass()
            try:
                await self._release_owed()
                published = 0
                while True:
                    kicks = self._kicks
                    records = await self._due()
                    if records:
                        published += await self._publish(records)
                    await self._lease.pass_done()
                    if not records and self._settled(kicks):
                        self.failed_on = None
                        return published
            except (BrokerError, StateError) as exc:
                # Failing: nobody waits for the retries, but a caller that began waiting
                # meanwhile gets the next try (on the broker, what published() gives now).
                broker = isinstance(exc, BrokerError)
                self.failed_on = BrokerError if broker else StateError
                self._waits.failed(number, cut_to=BROKER_RETRY_WAIT if broker else None)
                raise
            finally:
                self._waits.settle(self._owed)

    async def _publish(self, records: list[CommandRecord]) -> int:
        """Publishes these commands at once and marks them; returns how many were published.

        Raises:
            BrokerError: a publish failed; the others are marked (or ended) first.
        """
        results = await asyncio.gather(
            *(self._publisher.publish(record) for record in records),
            return_exceptions=True,
        )
        outcomes = list(zip(records, results, strict=True))
        await self._state.mark_published(
            [record.id for record, result in outcomes if result is True]
        )
        # Published, or expired before it could be: nothing more is owed for them.
        self._owed -= {r.id for r, result in outcomes if not isinstance(result, BaseException)}
        foreign = [(r, result) for r, result in outcomes if isinstance(result, QueueMismatch)]
        if foreign:
            self._owed -= self._foreign.met(foreign)
            self._lease.leave_after_pass()
        refused = [(r, result) for r, result in outcomes if isinstance(result, CommandRejected)]
        if refused:
            # Refused for good: ended, so they neither block the outbox nor come back.
            for record, refusal in refused:
                logger.error("command %s rejected: %s", record.id, refusal)
                self._observer.rejected(record)
            await self._state.reject([record.id for record, _ in refused])
            self._owed.difference_update(record.id for record, _ in refused)
        ended = CommandRejected | QueueMismatch
        failures = [
            r for _, r in outcomes if isinstance(r, BaseException) and not isinstance(r, ended)
        ]
        if failures:
            # A relay that cannot publish must not keep the sweep from the others.
            await self._lease.give_up()
            raise BrokerError(
                f"outbox: {len(failures)} of {len(records)} publishes failed"
            ) from failures[0]
        return sum(result is True for _, result in outcomes)

    async def _due(self) -> list[CommandRecord]:
        """The unpublished commands this pass publishes, in ready order (``relay_batch``, the
        oldest first). Owed ones are in the read or, when it came back full, past its end
        (held back until a read reaches them); missing from a read that was not full, a
        command was published (here or elsewhere), ended or expired."""
        now = self._state.clock()
        lease = timedelta(seconds=self._config.relay_lease)
        self._next_due = None
        due: dict[str, CommandRecord] = {}
        orphans: list[CommandRecord] = []
        young: dict[str, CommandRecord] = {}
        owed = set(self._owed)  # committed before the read (one owed during it: a kick reads again)
        batch = await self._state.unpublished(self._config.relay_batch)
        # A full read may have left older commands unread: nothing past its last is due yet.
        horizon = batch[-1].ready_at if len(batch) >= self._config.relay_batch else None
        for record in batch:
            if record.id in self._owed:
                due[record.id] = record
            elif record.id in self._in_flight:
                continue
            elif now - record.ready_at >= lease:
                orphans.append(record)
            else:
                young[record.id] = record
                self._due_at(record.ready_at + lease)
        unread = owed.difference(record.id for record in batch)
        if horizon is None:
            self._owed -= unread
            unread = set()
        self._holds.hold_back(young, due, horizon, now, unread)
        self._holds.orphan_devices = set()
        if orphans:
            await self._sweep(orphans, due)
        return rules.in_ready_order(due.values())

    async def _sweep(self, orphans: list[CommandRecord], due: dict[str, CommandRecord]) -> None:
        """Adds the orphans (unpublished past the writer's lease) this relay publishes: all
        of them while it holds the relay lease, so several relays on one index publish each
        orphan once; otherwise only those of devices it owes a command to, which must go
        out ahead of it (a copy the holder publishes too is dropped at delivery)."""
        owing = {record.device_id for record in due.values()}
        # Those whose queues refused this store's settings go to another process, with the
        # lease after this pass; unless owed ones must follow them (the queue was deleted).
        orphans, foreign = self._foreign.skip(orphans, owing)
        if foreign:
            self._lease.leave_after_pass()
        # Left to another relay: nothing goes out directly until they are published, or
        # what is owed to their devices would overtake them.
        self._holds.orphan_devices = foreign
        if not orphans:
            return
        if await self._lease.take():
            due.update((record.id, record) for record in orphans)
            return
        due.update((record.id, record) for record in orphans if record.device_id in owing)
        self._holds.orphan_devices |= {r.device_id for r in orphans if r.device_id not in owing}
        # Looked at again once the holder's lease may have lapsed (it died).
        self._due_at(self._state.clock() + timedelta(seconds=self._lease.seconds))

    def _due_at(self, moment: datetime) -> None:
        if self._next_due is None or moment < self._next_due:
            self._next_due = moment

    def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="amqp_queue.outbox")

    def halt(self) -> None:
        """Stops the relay's task at once (a close cut short): it uses the index no more. Told
        by ``_closed`` too, it ends at its next step should a pass lose the cancellation."""
        self._closed = True
        self._waits.end()
        self._wake.set()
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        self.halt()
        if self._task is not None:
            task = self._task
            try:
                await asyncio.wait([task])  # a CancelledError here is the caller's own
            except asyncio.CancelledError:
                logger.warning("close cut short: %d claims not given back", len(self._owed_release))
                raise
            self._task = None
            if not task.cancelled() and (error := task.exception()) is not None:
                logger.error("the outbox relay ended with an error", exc_info=error)
        # Tried again while the close allows: once closed, nobody gives these back.
        if not await self._release_owed(within=self._config.publish_timeout):
            logger.error(
                "closing with %d claimed commands not given back: they stay delivered to nobody",
                len(self._owed_release),
            )
        await self._lease.give_up()

    async def _backoff(self, seconds: float) -> None:
        """Sleeps between retries, cut short by a kick (the link is back, a caller waits)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()

    def _interval(self) -> float:
        """Seconds to the next pass: the interval, or when a writer's command is due."""
        interval = self._config.relay_interval
        if self._holds.found:  # live writers mark theirs within moments: read again soon
            interval = min(interval, _START_RECHECK)
        if self._owed_release:  # refused last pass: tried again soon, backing off
            interval = min(interval, self._owed_release.retry_in)
        if self._next_due is not None:
            due_in = (self._next_due - self._state.clock()).total_seconds()
            interval = min(interval, max(due_in, 0.0) + 0.05)
        return interval

    async def _run(self) -> None:
        """Passes until closed. A pass failing for another reason (a bug) is logged, counted
        and followed by a pause: ended silently, it would leave later commands waiting."""
        while not self._closed:
            try:
                await self._pass()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("outbox relay pass failed unexpectedly; restarting it")
                self._observer.relay_failed()
                await self._backoff(_RESTART_PAUSE)
                self._wake.set()

    async def _pass(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._interval()):
                await self._wake.wait()
        if self._closed:
            return
        self._wake.clear()
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((BrokerError, StateError)),
            wait=wait_exponential_jitter(multiplier=0.2, max=10.0),
            sleep=self._backoff,
            before_sleep=retry_log.before_sleep(logger, "outbox relay pass"),
            reraise=True,
        ):
            if self._closed:  # its cancellation lost in a failed try (halt woke it)
                return
            with attempt:
                published = await self.flush()
        if published:
            logger.info("outbox relay published %d commands", published)
