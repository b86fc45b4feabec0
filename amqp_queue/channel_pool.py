"""Channels for streams and drains, over as many connections as they need.

Each ``consume()`` stream and each drain reads its device queue on a channel of its own, so
that its acks, its prefetch window and a channel error stay its own. One AMQP connection
carries at most ``channel_max`` channels (2,047 on RabbitMQ by default), and the broker
closes the whole connection, with every stream and the publishing channel on it, when a
client opens one more. So the pool counts the channels it opened on each connection, opens
another robust connection to the same broker when those it has are full, and refuses a
channel beyond its limit with a :class:`~amqp_queue.errors.BrokerError` for the one call
that asked.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from aio_pika import Channel
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aio_pika.robust_channel import RobustChannel
from yarl import URL

from amqp_queue.channel_closing import close_channel
from amqp_queue.connection import FailoverConnection
from amqp_queue.errors import BrokerError, broker_errors

logger = logging.getLogger("amqp_queue.channel_pool")

OPENS_IN_FLIGHT = 64
"""Channel opens a store has before the broker at once; more wait their turn."""
# Seconds past its timeout an open unanswered keeps its turn (aio-pika's heartbeat is 60 s).
_TURN_MOST = 120.0


class ChannelPool:
    """Opens delivery channels on the store's connection, then on more of its own.

    Args:
        primary: the store's connection; the pool never closes it.
        channels_per_connection: the most channels the pool opens on one connection (also
            bounded by what the broker negotiated, less what the store keeps for itself on
            the primary one).
        max_connections: connections in all, the primary one included.
        reserved: channels of the primary connection the store keeps for its own
            (publishing, declaring queues).
        timeout: seconds to wait for a connection to be up (a reconnect), for the broker's
            answer to an open, and for a turn among the opens in flight while the broker
            answers none, before failing.
    """

    def __init__(
        self,
        primary: AbstractRobustConnection,
        *,
        channels_per_connection: int,
        max_connections: int,
        reserved: int,
        timeout: float,
    ) -> None:
        self._primary = primary
        self._per_connection = channels_per_connection
        self._max_connections = max_connections
        self._timeout = timeout
        self._reserved = reserved
        # The channels the pool opened on each connection and that are not closed yet.
        self._open: dict[AbstractRobustConnection, set[object]] = {primary: set()}
        self._owned: list[AbstractRobustConnection] = []
        self._adding = asyncio.Lock()
        # Opens in flight at once: 2,000 streams starting together (a fleet reconnecting)
        # put 2,000 opens before the broker and the event loop, and the last answers came
        # past the timeout under load; in turns, the timeout bounds the broker's answer only.
        self._turns = _Turns(timeout)

    @property
    def limit(self) -> int:
        """How many delivery channels the pool opens at most, as configured."""
        return self._per_connection * self._max_connections

    @property
    def connections(self) -> int:
        """Connections in use, the primary one included."""
        return len(self._open)

    async def channel(self, doing: str, *, robust: bool = True) -> AbstractChannel:
        """A new channel on a connection with room for it.

        ``robust=False``: a plain channel, which dies with its connection or a channel error
        instead of being restored. For a drain: aio-pika restores a robust channel closed
        under it (as aiormq closes a channel whose RPC was cancelled, when a drain's caller
        is cancelled) with its consumers, and a restore crossing the drain's own close
        brought back a consumer nobody read, with no prefetch bound, holding every message
        of the device queue unacknowledged for as long as the connection lived.

        Raises:
            BrokerError: the broker cannot be reached, or every connection the pool may open
                is full.
        """
        connection = await self._with_room(doing)
        # Counted before the await, so concurrent callers see the room it takes.
        placeholder = _Placeholder()
        self._open[connection].add(placeholder)
        try:
            with broker_errors(doing):
                try:
                    async with asyncio.timeout(self._timeout):
                        await connection.ready()
                    channel = await self._open_in_turn(connection, doing, robust=robust)
                except RuntimeError as exc:
                    # aio-pika says "connection closed" with a bare RuntimeError.
                    raise BrokerError(f"{doing} failed: {exc}") from exc
        finally:
            self._open[connection].discard(placeholder)
        self._open[connection].add(channel)
        channel.close_callbacks.add(lambda *_: self._released(connection, channel))
        return channel

    async def _open_in_turn(
        self, connection: AbstractRobustConnection, doing: str, *, robust: bool
    ) -> AbstractChannel:
        await self._turns.take(doing)
        opening = asyncio.ensure_future(_open(connection, robust=robust))
        self._turns.held_by(opening)
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(opening)
        except BaseException:
            # An open cut off half way leaves client and broker disagreeing about the
            # channel, and the broker closes the whole connection on the next frame for
            # it: the open finishes by itself and is closed again.
            opening.add_done_callback(functools.partial(_close_unwanted, self._timeout))
            raise

    async def close(self) -> None:
        """Closes the connections the pool opened (not the primary one). Each is forgotten
        once closed: a close cut short (the caller's deadline) leaves the rest to the next."""
        while self._owned:
            connection = self._owned[0]
            self._open.pop(connection, None)
            await connection.close()
            self._owned.remove(connection)

    def _released(self, connection: AbstractRobustConnection, channel: AbstractChannel) -> None:
        # A robust channel reports a close also when its connection drops and it will be
        # restored on the same connection: that one still takes its place. Only a close its
        # owner asked for gives the place back. (Idempotent: it may report more than once.)
        if isinstance(channel, RobustChannel) and not getattr(channel, "_close_called", True):
            return
        self._open.get(connection, set()).discard(channel)

    def _room(self, connection: AbstractRobustConnection) -> int:
        most = self._per_connection
        negotiated = _channel_max(connection)
        if negotiated is not None:
            # Channel numbers run 1..channel_max.
            kept = self._reserved if connection is self._primary else 0
            most = min(most, negotiated - kept)
        return most - len(self._open[connection])

    async def _with_room(self, doing: str) -> AbstractRobustConnection:
        for connection in self._open:
            if self._room(connection) > 0:
                return connection
        async with self._adding:
            # Another caller may have added a connection while this one waited.
            for connection in self._open:
                if self._room(connection) > 0:
                    return connection
            if len(self._open) >= self._max_connections:
                raise BrokerError(
                    f"{doing} failed: {self.limit} streams and drains are open at once, the "
                    f"most this store opens (RabbitMQConfig.channels_per_connection x "
                    f"max_connections); close some, or raise those"
                )
            added = FailoverConnection(_nodes_of(self._primary), first=len(self._open))
            try:
                with broker_errors(f"{doing}: opening another connection"):
                    async with asyncio.timeout(self._timeout):
                        await added.connect()
            except BaseException:
                await added.close()
                raise
            logger.info(
                "%d delivery channels open: another connection to the broker (%d in all)",
                sum(len(channels) for channels in self._open.values()),
                len(self._open) + 1,
            )
            self._owned.append(added)
            self._open[added] = set()
            return added


def _nodes_of(connection: AbstractRobustConnection) -> list[URL]:
    """The broker nodes the store's connection uses (credentials included)."""
    if isinstance(connection, FailoverConnection):
        return connection.nodes
    url = getattr(connection, "url", None)
    if not isinstance(url, URL):
        raise BrokerError("another connection is needed, but the store's has no URL to copy")
    return [url]


class _Turns:
    """Places among the channel opens in flight, each held by its open: given back when the
    broker answers it, not when its caller stops waiting (the open goes on). An answer that
    never comes ends with the connection (its heartbeat); should the open outlive that, its
    place is given back :data:`_TURN_MOST` seconds past its timeout."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._free = asyncio.Semaphore(OPENS_IN_FLIGHT)
        self._answered = 0

    async def take(self, doing: str) -> None:
        """Waits for a place for as long as opens are answered (behind thousands of them,
        a fleet reconnecting, that is long); when none was for ``timeout`` seconds, the
        broker stopped answering and the wait fails."""
        while True:
            answered = self._answered
            try:
                async with asyncio.timeout(self._timeout):
                    await self._free.acquire()
                return
            except TimeoutError:
                if self._answered == answered:
                    raise BrokerError(
                        f"{doing} failed: the broker answered no channel open in {self._timeout} s"
                    ) from None

    def held_by(self, opening: asyncio.Future[AbstractChannel]) -> None:
        held = True

        def release(*_: object) -> None:
            nonlocal held
            if held:
                held = False
                backstop.cancel()
                self._answered += 1
                self._free.release()

        backstop = asyncio.get_running_loop().call_later(_TURN_MOST + self._timeout, release)
        opening.add_done_callback(release)


class _Placeholder:
    """Holds a channel's place in the count while it is being opened."""


def _channel_max(connection: AbstractRobustConnection) -> int | None:
    """The channel_max the broker negotiated on this connection, if it is up."""
    transport = getattr(connection, "transport", None)
    tune = getattr(getattr(transport, "connection", None), "connection_tune", None)
    value = getattr(tune, "channel_max", None)
    # 0 means no limit in AMQP 0-9-1.
    return value if isinstance(value, int) and value > 0 else None


async def _open(connection: AbstractRobustConnection, *, robust: bool) -> AbstractChannel:
    # Without publisher confirms: a delivery channel only consumes and acks, and
    # Confirm.Select is one more round trip per open.
    if robust:
        return await connection.channel(publisher_confirms=False)
    return await Channel(connection, publisher_confirms=False)


def _close_unwanted(timeout: float, opening: asyncio.Future[AbstractChannel]) -> None:
    """Closes a channel whose opener gave up on it (timed out or cancelled)."""
    if opening.cancelled() or opening.exception() is not None:
        return
    closing = close_channel(opening.result(), timeout, "a channel opened too late")
    task = asyncio.ensure_future(closing)
    _closing.add(task)
    task.add_done_callback(_closing.discard)


# Strong references to the background closes of unwanted channels (asyncio keeps weak ones).
_closing: set[asyncio.Future[None]] = set()
