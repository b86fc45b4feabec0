"""RabbitMQStore: RabbitMQ-native delivery with a durable state index behind it.

The index (a :mod:`state` backend) is written first and holds dedup, confirmation and
delivery state, so nothing of it is lost on a restart. A command is published only when it
is ready (plain and replacing commands at once, confirmation commands on confirm) to its
device's queue; at delivery only ids the index holds as live are handed out.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Self

from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from amqp_queue.broker_start import BrokerStart
from amqp_queue.calls_in_flight import CallsInFlight, counted
from amqp_queue.channel_closing import close_drain_channel
from amqp_queue.channel_pool import ChannelPool
from amqp_queue.config import RabbitMQConfig
from amqp_queue.connection import BrokerUrls, broker_urls, connect_robust
from amqp_queue.drain import drain, open_drain
from amqp_queue.errors import BrokerError, closed_under
from amqp_queue.fleet import FleetDelivery
from amqp_queue.mark_commits import MarkCommits
from amqp_queue.observer import Observer
from amqp_queue.outbox import OutboxRelay
from amqp_queue.owed_at_close import publish_owed
from amqp_queue.publish_path import PublishPath
from amqp_queue.publisher import Publisher
from amqp_queue.relay_holds import WRITER_GRACE
from amqp_queue.running_deliveries import CLOSE_GRACE, RunningDeliveries
from amqp_queue.state import rules
from amqp_queue.state.cancellation import refuse_if_cancelled
from amqp_queue.state.clock import Clock, utc_now
from amqp_queue.state.closing import Closing
from amqp_queue.state.enqueue_calls import CommandIntake
from amqp_queue.state.errors import StateError
from amqp_queue.state.factory import DEFAULT_STATE_URL, open_state
from amqp_queue.state.indexed_store import DEFAULT_RETENTION, IndexedStore
from amqp_queue.state.model import CommandRecord, CommandStatus, PendingCommand
from amqp_queue.stream import CommandStream
from amqp_queue.topology import Topology

logger = logging.getLogger("amqp_queue.store")


class RabbitMQStore(FleetDelivery, Closing, BrokerStart, CommandIntake):
    """The command store delivering over RabbitMQ, one durable queue per device.

    Args:
        connection: a robust aio-pika connection; the caller keeps ownership.
        config: exchange, queue type, prefetch, limits and timings.
        state: the state index; the caller keeps ownership. :meth:`connect` opens both
            from URLs and owns them.

    Use it as an async context manager (``async with store:``) or call :meth:`start` and
    :meth:`close`.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        config: RabbitMQConfig | None = None,
        *,
        state: IndexedStore,
        observer: Observer | None = None,
    ) -> None:
        self.config = config or RabbitMQConfig()
        self.state = state
        self.limits = self.config.limits  # what the shared intake validates with
        self.clock = state.clock
        self.observer = observer or Observer()
        self._connection = connection
        self._owned: list[IndexedStore | AbstractRobustConnection] = []
        self._channel: AbstractChannel | None = None
        self._declaring: list[AbstractChannel] = []
        self._topology: Topology | None = None
        self._publisher: Publisher | None = None
        self._relay: OutboxRelay | None = None
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False  # close(): a call needing the broker fails at once
        self._calls = CallsInFlight()  # enqueues and confirms under way: close waits
        self._closed_all = False  # a close ran to its end: nothing is left to close
        self._path = PublishPath(state, self.observer, cancelled_wait=self.config.publish_timeout)
        # Started without its broker: the task that starts the store once it is reachable.
        self._starter: asyncio.Task[None] | None = None
        self._channels = ChannelPool(
            connection,
            channels_per_connection=self.config.channels_per_connection,
            max_connections=self.config.max_connections,
            # The publishing channel, the declaring ones, and one to spare for the caller's.
            reserved=2 + self.config.declare_channels,
            timeout=self.config.publish_timeout,
        )
        self._running = RunningDeliveries()  # what close() ends: streams and drains
        self._marks = MarkCommits(self.state)

    @classmethod
    async def connect(
        cls,
        amqp_url: BrokerUrls,
        *,
        state_url: str = DEFAULT_STATE_URL,
        config: RabbitMQConfig | None = None,
        clock: Clock = utc_now,
        retention: timedelta = DEFAULT_RETENTION,
        connect_timeout: float = 30.0,
        observer: Observer | None = None,
    ) -> RabbitMQStore:
        """Connects to the broker and opens the state index named by ``state_url``.

        ``amqp_url`` is one AMQP URL, or a cluster's nodes: a list of URLs, or one string of
        URLs separated by commas. Each connection attempt, the first and every reconnect,
        goes to the next node in turn (see :mod:`amqp_queue.connection`).

        ``state_url`` is a SQLite file by default; ``postgresql+asyncpg://`` selects PostgreSQL
        (``?schema=<name>``: that existing schema), ``memory://`` an in-process state that
        does not survive a restart; see :func:`amqp_queue.state.open_state`.

        Raises:
            ValueError: ``amqp_url`` holds no URL or one not ``amqp(s)://host``; ``state_url``
                names no known backend or a schema that is not a plain identifier.
            BrokerError: the broker could not be reached within ``connect_timeout`` seconds.
            StateError: the state index could not be opened.
        """
        config = config or RabbitMQConfig()
        broker_urls(amqp_url)  # a bad address is refused before anything is opened
        state = await open_state(state_url, limits=config.limits, clock=clock, retention=retention)
        try:
            connection = await connect_robust(amqp_url, connect_timeout)
        except BaseException:
            await state.close()
            raise
        store = cls(connection, config, state=state, observer=observer)
        store._owned = [state, connection]
        try:
            await store.start()
        except BaseException:
            await store.close()
            raise
        return store

    # -- life cycle ---------------------------------------------------------------------

    async def close(self) -> None:
        """Ends running streams and drains, stops the relay, flushes pending index updates
        and closes what the store owns.

        A drain still reading its queue returns nothing and leaves it queued (one already
        claiming returns what it claimed); a ``consume`` loop waiting for the next command
        ends, one whose body runs ends when it asks for the next (its command settled), or
        after ``CLOSE_GRACE`` (2) s with the command requeued. Drains are waited for up to
        ``publish_timeout`` s while the broker and index are open, then about 2 s more for
        channels and a cancelled drain's give-back; a stream's delivery marks up to
        ``publish_timeout`` too, then 1 s for the marks closed streams owe, and enqueues,
        confirms and relay passes under way up to ``publish_timeout``, also when the close is
        cut short. A stalled index holds each step for its own bound. Cut short (the caller's
        deadline), a close still stops the relay and closes what the store owns; called
        again, it finishes what is left.
        """
        if self._closed_all:
            return
        self._closed = True
        calls_waited = False
        try:
            await self._stop_starter()
            await self._running.end(drain_grace=self.config.publish_timeout)
            await self._running.wait_background()
            await self._marks.close(self.config.publish_timeout)  # what closed streams owe
            # Before the relay and the channels go (see calls_in_flight).
            await self._calls.wait(self.config.publish_timeout)
            calls_waited = True
            if self._relay is not None:
                if not self.broker_pending:
                    await publish_owed(self._relay, self.config.publish_timeout)
                await self._relay.close()
            await self._path.flush()
            self._connection.reconnect_callbacks.discard(self._on_reconnect)
            await self._close_channels()
        finally:
            self._started = False
            try:
                if not calls_waited:
                    # Cut short before the wait above: the calls under way still publish, on
                    # the relay and channels still open, rather than leave their commands owed.
                    await self._calls.wait(self.config.publish_timeout)
            finally:
                await self._close_owned()

    async def _close_owned(self) -> None:
        """The end of :meth:`close`, also when it was cut short: the relay and the marks
        halted, the channels, connections and index closed (each forgotten once closed)."""
        if self._relay is not None:
            self._relay.halt()  # cut short: it must not use what closes below
        self._marks.halt()  # likewise: no background mark on a closed index
        try:
            await self._channels.close()
            for resource in [r for r in reversed(self._owned) if r is not self.state]:
                await resource.close()
                self._owned = [r for r in self._owned if r is not resource]
            # A drain that outlived the grace meets closed channels now; what it claimed
            # goes back to the index before the index closes, and so does the give-back
            # of a drain cancelled meanwhile (its channel's close waits for it, bounded).
            await self._running.wait_drains(CLOSE_GRACE)
            await self._running.wait_background()
            await self._path.flush()  # the marks of publishes answered meanwhile
        finally:
            try:
                if self.state in self._owned:
                    await self.state.close()
                    self._owned = [r for r in self._owned if r is not self.state]
                self._closed_all = not self._owned
            finally:
                self._running.ended()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    # -- the Store contract -------------------------------------------------------------

    async def get_pending(self, device_id: str) -> list[PendingCommand]:
        return await self.state.get_pending(self._device(device_id))

    async def get_pending_confirmations(self, device_id: str) -> list[PendingCommand]:
        return await self.state.get_pending_confirmations(self._device(device_id))

    async def drain_pending(self, device_id: str) -> list[bytes]:
        """Empties the device's queue and returns the live commands' payloads, in ready order."""
        records = await self.drain_commands(device_id)
        return [record.payload for record in records]

    async def drain_commands(self, device_id: str) -> list[CommandRecord]:
        """Like :meth:`drain_pending`, with the whole records (ids, types, expiry)."""
        device = self._device(device_id)
        refuse_if_cancelled()
        with closed_under(f"draining {device}"), self._running.drain() as running:
            topology = await self._ready()
            assert self._relay is not None
            if self._relay.pending:
                await self._flush_outbox()
            closing, background = (lambda: self._closed), self._running.background
            channel, inbox = await open_drain(
                self._channels, topology, self.config, device, background, closing
            )
            try:
                running.consuming(inbox)
                records = await drain(
                    inbox, self.state, self.config, device, self.observer, self._relay, self._marks
                )
            finally:
                # Not awaited by the caller: once the drain has returned, a cancellation
                # while the channel closes must not take the commands it claimed with it.
                self._running.background(
                    close_drain_channel(channel, device, self.config, inbox.settling)
                )
        return rules.in_ready_order(records)

    def consume(self, device_id: str) -> CommandStream:
        """The device's commands as they arrive; see :class:`CommandStream`.

        ``async with store.consume(device) as stream: async for command in stream: ...``
        """
        device = self._device(device_id)

        async def open_channel() -> tuple[AbstractChannel, Topology]:
            topology = await self._ready()
            channel = await self._channels.channel(f"opening a channel to consume {device}")
            return channel, topology

        report, marks = self._outcome_reporter(), self._marks
        return self._running.stream(
            CommandStream(
                open_channel, self.state, self.config, device, self.observer, report, marks
            )
        )

    async def confirm_command(self, command_id: str, *, by: str | None = None) -> None:
        await self.confirm_changed(command_id, by=by)

    @counted
    async def confirm_changed(self, command_id: str, *, by: str | None = None) -> bool:
        """Confirms a command as :meth:`confirm_command` does, and tells whether this call
        confirmed it (False when it needed no confirmation, was confirmed already or was
        delivered: harmless, and nothing changed)."""
        self._refuse_if_closed()  # its relay going: the command would wait for another's
        reachable = not self.broker_pending and await (await self._ready()).declared_before_write(
            (await self.state.get_command(command_id)).device_id
        )
        # Committed, the command is ready: a cancelled caller must not leave it to wait out
        # the relay's lease behind newer ones. Failed, it may have landed (answer lost):
        # owed, before the next write's turn; the relay forgets it if not ready.
        record, changed = await self._path.write_outside(
            self.state.confirm_changed(command_id, by=by),
            self._ready_unpublished,
            if_unknown=(command_id,),
        )
        if changed:
            # A confirm that changed nothing (twice, a plain or a delivered command) is
            # harmless and is not an operator's approval: it is not counted.
            self.observer.confirmed(record)
        # The call that made it ready publishes it. Confirming again (rule 4, any process)
        # returns only once it is in its queue, or a later enqueue would overtake it; past
        # the writer's grace (that call stuck) it publishes it too (a copy, dropped).
        if not rules.is_deliverable(record, self.state.clock()) or record.published_at is not None:
            return changed
        if not reachable:
            self._path.owe(record.id)
        elif changed or await self._path.published_elsewhere([record.id], WRITER_GRACE):
            await self._path.publish(record)
        return changed

    def _ready_unpublished(self, confirmed: tuple[CommandRecord, bool]) -> list[CommandRecord]:
        record, changed = confirmed
        return self._unpublished_ready([record]) if changed else []

    async def cancel_command(self, command_id: str, *, by: str | None = None) -> None:
        # A message already in the queue stays there and is dropped at delivery.
        self.observer.cancelled(await self.state.cancel(command_id, by=by))

    async def cleanup(self) -> int:
        """See :meth:`IndexedStore.cleanup`: returns how many commands expired; those it
        ended ``TIMED_OUT`` are reported to the observer, not counted."""
        sweep = await self.state.sweep()
        self.observer.expired(sweep.expired)
        if sweep.timed_out:
            self.observer.timed_out(sweep.timed_out)
        return sweep.expired

    async def get_status(self, command_id: str) -> CommandStatus:
        return await self.state.get_status(command_id)

    async def ensure_queue(self, device_id: str) -> None:
        """Declares and binds the device's queue (idempotent); call it when a device connects."""
        topology = await self._ready()
        await topology.ensure_queue(self._device(device_id))

    @property
    def declared_devices(self) -> list[str]:
        """Devices whose queues this store declared (for tooling and test clean-up)."""
        return [] if self._topology is None else self._topology.declared_devices

    @counted
    async def relay_outbox(self) -> int:
        """Publishes every ready command the broker has not confirmed; returns how many."""
        await self._ready()
        assert self._relay is not None
        return await self._relay.flush()

    # -- internals ----------------------------------------------------------------------

    def _validate_device(self, device_id: object) -> str:
        # The limits, and a queue name within AMQP's 255 bytes, before anything is written.
        return self.config.validate_device(device_id)

    _device = _validate_device

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise BrokerError("the store is closed; open a new one")

    async def _ready(self) -> Topology:
        self._refuse_if_closed()
        if self.broker_pending:
            raise BrokerError("the broker is unreachable; the store keeps trying to connect")
        if not self._started:
            await self.start()
        assert self._topology is not None
        return self._topology

    @counted
    async def _accept(self, record: CommandRecord) -> str:
        self._refuse_if_closed()  # also while the broker was pending: its relay is gone
        if self.broker_pending:
            # The broker is known to be down: into the index at once, owed to the relay.
            await self._path.write(record)
            if record.is_ready:
                self._path.owe(record.id)
            return record.id
        with closed_under(f"enqueueing command {record.id}"):
            topology = await self._ready()
            reachable = await topology.declared_before_write(record.device_id)
            await self._path.write(record)
            if record.is_ready:
                if reachable:
                    await self._path.publish(record)
                else:
                    self._path.owe(record.id)
        return record.id

    async def _flush_outbox(self) -> None:
        assert self._relay is not None
        try:
            await self._relay.flush()
        except (BrokerError, StateError) as exc:
            logger.warning("outbox not flushed (the relay goes on trying): %s", exc)
