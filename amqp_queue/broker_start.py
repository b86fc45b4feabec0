"""How a RabbitMQStore starts on its broker: channels, topology, publisher and relay.

It may start without the broker (a sidecar restarted during an outage) and then keeps trying
in the background, taking commands into the index meanwhile (see :meth:`BrokerStart.start`).
"""

from __future__ import annotations

import asyncio
import logging

from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from amqp_queue.channel_closing import close_channel
from amqp_queue.config import RabbitMQConfig
from amqp_queue.errors import BROKER_FAILURES, BrokerError, broker_errors
from amqp_queue.observer import Observer
from amqp_queue.outbox import OutboxRelay
from amqp_queue.publish_path import PublishPath
from amqp_queue.publisher import Publisher
from amqp_queue.state.errors import StateError
from amqp_queue.state.indexed_store import IndexedStore
from amqp_queue.topology import Topology

logger = logging.getLogger("amqp_queue.store")

# Seconds start(wait_for_broker=False) gives a connection still trying before it starts
# without the broker (and the first pause between attempts after that).
_BROKER_GRACE = 2.0
# A connection not up yet: its wait timed out, or aio-pika says "closed" with a RuntimeError.
_NOT_REACHABLE: tuple[type[BaseException], ...] = (*BROKER_FAILURES, RuntimeError)
# Also the index: a blip of it as the broker comes back must not end the starter.
_STILL_DOWN: tuple[type[BaseException], ...] = (BrokerError, StateError, *_NOT_REACHABLE)


class BrokerStart:
    """The broker side of :class:`~amqp_queue.store.RabbitMQStore`'s life cycle."""

    config: RabbitMQConfig
    state: IndexedStore
    observer: Observer
    _connection: AbstractRobustConnection
    _channel: AbstractChannel | None
    _declaring: list[AbstractChannel]
    _topology: Topology | None
    _publisher: Publisher | None
    _relay: OutboxRelay | None
    _path: PublishPath
    _start_lock: asyncio.Lock
    _started: bool
    _starter: asyncio.Task[None] | None

    async def start(self, *, wait_for_broker: bool = True) -> None:
        """Declares the exchange, opens the publishing channel and runs the outbox relay.

        Args:
            wait_for_broker: True (the default): a broker that cannot be reached is a
                :class:`BrokerError`. False: the store starts anyway and keeps trying in the
                background (a sidecar restarted during a broker outage): meanwhile enqueues
                and confirmations go into the index at once and are published, in order, as
                soon as the broker is reachable; drains and streams fail with BrokerError.
        """
        if not wait_for_broker and not self._started:
            # The index's answer does not wait for the broker: another exchange's is refused now.
            await self.state.claim_outbox(self.config.exchange)
            try:
                # A connection still trying is not waited for: the outage may be long.
                async with asyncio.timeout(_BROKER_GRACE):
                    await self._connection.ready()
            except _NOT_REACHABLE as exc:
                self._start_in_background(f"not connected ({type(exc).__name__})")
                return
        try:
            await self._start_on_broker()
        except BrokerError as exc:
            if wait_for_broker:
                raise
            self._start_in_background(str(exc))

    async def _start_on_broker(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            await self.state.claim_outbox(self.config.exchange)
            try:
                self._channel = await self._open_channel(
                    "opening the publishing channel", publisher_confirms=True
                )
                # One at a time into the list _close_channels() closes, so none leaks if a
                # later one fails.
                for _ in range(self.config.declare_channels):
                    self._declaring.append(
                        await self._open_channel("opening a channel to declare queues")
                    )
                self._topology = Topology(self._channel, self.config, declaring=self._declaring)
                await self._topology.declare_exchange()
            except BaseException:
                await self._close_channels()
                raise
            self._publisher = Publisher(self._topology, self.config, self.state.clock)
            self._relay = OutboxRelay(
                self.state,
                self._publisher,
                self.config,
                in_flight=self._path.in_flight,
                observer=self.observer,
                land_marks=self._path.flush,
            )
            self._path.attach(self._publisher, self._relay)
            self._connection.reconnect_callbacks.add(self._on_reconnect)
            self._started = True
        try:
            await self._relay.flush()
        except (BrokerError, StateError) as exc:
            logger.warning("start-up outbox pass failed, the relay will retry: %s", exc)
        finally:
            # Whatever the first pass met: the relay's own task retries, and without it
            # every later command would wait for a pass that never comes.
            self._relay.start()

    def _start_in_background(self, why: str) -> None:
        if self._starter is None or self._starter.done():
            logger.warning(
                "broker unreachable (%s): accepting commands into the index and connecting "
                "in the background",
                why,
            )
            self._starter = asyncio.create_task(
                self._start_when_reachable(), name="amqp_queue.store.start"
            )

    async def _start_when_reachable(self) -> None:
        pause = _BROKER_GRACE
        while not self._started:
            try:
                async with asyncio.timeout(pause):
                    await self._connection.ready()
                await self._start_on_broker()
            except _STILL_DOWN as exc:
                logger.debug("broker still unreachable: %s", exc)
                await asyncio.sleep(min(pause, 1.0))
                pause = min(pause * 2, 30.0)
        logger.info("broker reachable: the store is started")

    @property
    def broker_pending(self) -> bool:
        """Whether the store started without its broker and is still waiting for it."""
        return not self._started and self._starter is not None

    async def _stop_starter(self) -> None:
        """Ends a background start (the store is closing)."""
        if self._starter is not None:
            self._starter.cancel()
            try:
                await self._starter
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # it ended by itself; closing goes on regardless
                logger.error("the background start had failed: %s", exc)
            self._starter = None

    async def _close_channels(self) -> None:
        channels, self._declaring = [self._channel, *self._declaring], []
        self._channel = None
        # At once, not one after another: on a stalled link each waits publish_timeout, and
        # the close is bounded by one publish_timeout, not one per channel.
        await asyncio.gather(
            *(
                close_channel(channel, self.config.publish_timeout, "a channel of the store")
                for channel in channels
                if channel is not None and not channel.is_closed
            )
        )

    async def _open_channel(
        self, doing: str, *, publisher_confirms: bool = False
    ) -> AbstractChannel:
        """A new channel once the connection is up, waiting for a reconnect within limits."""
        with broker_errors(doing):
            try:
                async with asyncio.timeout(self.config.publish_timeout):
                    await self._connection.ready()
                    return await self._connection.channel(publisher_confirms=publisher_confirms)
            except RuntimeError as exc:
                # aio-pika says "connection closed" with a bare RuntimeError.
                raise BrokerError(f"{doing} failed: {exc}") from exc

    def _on_reconnect(self, *_: object) -> None:
        logger.info("broker connection restored; relaying the outbox")
        if self._relay is not None:
            self._relay.broker_back()
