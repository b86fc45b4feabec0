"""The broker topology: the commands exchange and one durable queue per device."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustChannel,
    ExchangeType,
)
from aiormq.abc import FieldTable

from amqp_queue.channel_closing import usable
from amqp_queue.config import QueueType, RabbitMQConfig
from amqp_queue.errors import (
    BrokerError,
    broker_errors,
    closed_under_the_call,
    queue_declaration,
)

logger = logging.getLogger("amqp_queue.topology")

T = TypeVar("T")

# Tries of a declaration or deletion whose shared declaring channel closed under it (each on
# the next channel, 0.3 s of pauses in all; within the call's publish_timeout).
_CHANNEL_TRIES = 5
_CHANNEL_CUT: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ChannelNotFoundEntity,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
)


class _Line:
    """Callers waiting for one device queue's declaration; each waits for the last before it."""

    def __init__(self, declared: asyncio.Future[None]) -> None:
        self.last = declared
        self.waiting = 0


class Topology:
    """Declares the exchange and device queues, remembering which queues exist.

    A command must never be published before its device's queue exists: RabbitMQ confirms an
    unroutable message as if it had been delivered. Declared queues are cached so the hot
    path pays for the declaration once per device; :meth:`forget` drops a queue from the
    cache when a publish comes back unroutable (somebody deleted the queue). The cache keeps
    the ``declared_cache`` most recently used devices: a device it forgot is declared again,
    which the broker answers at once for a queue that exists.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        config: RabbitMQConfig,
        *,
        declaring: Sequence[AbstractChannel] = (),
    ) -> None:
        self._channel = channel
        self._config = config
        # Device queues are declared round-robin over these: one channel's declarations run
        # one at a time on the broker.
        self._declaring = list(declaring) or [channel]
        self._declarations = 0
        self._exchange: AbstractExchange | None = None
        # Least recently used first, both of them.
        self._declared: OrderedDict[str, asyncio.Future[None]] = OrderedDict()
        # Per device, the callers that met its declaration under way, in arrival order.
        self._lines: dict[str, _Line] = {}
        # The devices whose queues this process declared last, by a publish, a drain or a
        # consume.
        self._devices: OrderedDict[str, None] = OrderedDict()
        # Per device, the calls on its queue (in_use) and the deletion on the broker now (see
        # _apart()).
        self._using_now: dict[str, set[asyncio.Future[Any]]] = {}
        self._deleting_now: dict[str, asyncio.Future[None]] = {}

    @property
    def exchange(self) -> AbstractExchange:
        if self._exchange is None:
            raise RuntimeError("Topology.declare_exchange() has not run")
        return self._exchange

    @property
    def channel(self) -> AbstractChannel:
        """The publishing channel the exchange and device queues are declared on."""
        return self._channel

    @property
    def declared_devices(self) -> list[str]:
        """Devices whose queues this process declared (publishing, draining or consuming),
        the last ``declared_cache`` of them, least recent first."""
        return list(self._devices)

    @property
    def queue_arguments(self) -> FieldTable:
        # Classic queues get no arguments at all, so queues declared by other tools without
        # arguments stay equivalent. No x-expires: an expiring queue drops its messages
        # without dead-lettering them.
        if self._config.queue_type is QueueType.QUORUM:
            return {"x-queue-type": QueueType.QUORUM.value}
        return {}

    async def declare_exchange(self) -> AbstractExchange:
        with broker_errors(f"declaring exchange {self._config.exchange!r}"):
            self._exchange = await self._channel.declare_exchange(
                self._config.exchange, ExchangeType.DIRECT, durable=self._config.durable
            )
        return self._exchange

    async def ensure_queue(self, device_id: str) -> asyncio.Future[None]:
        """Declares and binds the device's queue once per process; idempotent. Returns the
        declaration the caller waited for, for :meth:`forget`.

        Raises:
            QueueMismatch: the queue exists with another type or durability.
            BrokerError: the broker failed or did not answer within ``publish_timeout``.
        """
        declared = self._declared.get(device_id)
        if declared is None:
            declared = asyncio.get_running_loop().create_future()
            self._declared[device_id] = declared
            self._forget_least_recent()
            # A task of its own, shielded: a caller cancelled meanwhile leaves it to finish
            # (aiormq closes the channel an RPC is cancelled on, and the declaring channels
            # are shared), and the callers in line behind it get its outcome, not the
            # first caller's cancellation.
            declaring = asyncio.ensure_future(self._declare(device_id))
            declaring.add_done_callback(
                functools.partial(self._declaration_done, device_id, declared)
            )
            await asyncio.shield(declaring)
            return declared
        self._declared.move_to_end(device_id)
        if device_id not in self._lines and declared.done():
            # The hot path of every publish: no shield, no extra future.
            declared.result()
            return declared
        await self._wait_in_line(device_id, declared)
        return declared

    async def _declare(self, device_id: str) -> None:
        # Not robust: a declaring channel need not re-declare every device queue after a
        # reconnect; a publish that comes back unroutable declares it again. Bounded: during
        # an outage a robust channel waits for the broker, and the enqueue waiting on this
        # must return and leave its command to the outbox.
        with broker_errors(f"declaring the queue of {device_id!r}"):
            async with asyncio.timeout(self._config.publish_timeout):
                await self._on_a_declaring_channel(
                    lambda channel: self.declare_queue(channel, device_id, robust=False)
                )

    async def _on_a_declaring_channel(self, call: Callable[[AbstractChannel], Awaitable[T]]) -> T:
        """``call`` on a declaring channel, made again on the next one when the channel closed
        under it. The declaring channels are shared, and the broker closes one over any of
        its calls' refusals, failing every call waiting on it: a retire by another store
        deleting a queue between its declaration and its binding here failed the
        declarations and deletions of other devices, naming the retired device's queue."""
        for attempt in range(_CHANNEL_TRIES):
            try:
                return await call(self._next_channel())
            except BaseException as exc:
                # As aiormq raises it, or as declare_queue passes it on (a BrokerError).
                cause = exc.__cause__ if isinstance(exc, BrokerError) else exc
                cut = isinstance(cause, _CHANNEL_CUT) or (
                    cause is not None and closed_under_the_call(cause)
                )
                if not cut or attempt + 1 == _CHANNEL_TRIES:
                    raise
                logger.debug("a declaring channel closed under a call, again: %r", exc)
                # The broker may have closed the others as well: their reopening takes a
                # round trip or two.
                await asyncio.sleep(0.02 * 2**attempt)
        raise AssertionError("unreachable: the last try raises")

    def _declaration_done(
        self, device_id: str, declared: asyncio.Future[None], declaring: asyncio.Task[None]
    ) -> None:
        failure: BaseException | None = (
            asyncio.CancelledError() if declaring.cancelled() else declaring.exception()
        )
        if failure is None:
            declared.set_result(None)
            return
        if self._declared.get(device_id) is declared:  # not forgotten meanwhile
            del self._declared[device_id]
        declared.set_exception(failure)
        # Whoever waits on it sees the failure; nobody waiting is no unretrieved error.
        declared.exception()

    async def _wait_in_line(self, device_id: str, declared: asyncio.Future[None]) -> None:
        """Waits for the device's declaration behind every caller that came before.

        The device queue holds commands in the order their publishes reach the channel, and
        commands are handed to the publisher in write order. Woken by the declaration, the
        waiters resume a step or two later; a caller arriving in between must not find the
        queue declared and go first, or a later command would overtake earlier ones. So each
        caller waits for the one before it, and the first for the declaration itself.
        """
        line = self._lines.get(device_id)
        if line is None:
            line = self._lines[device_id] = _Line(declared)
        ahead, mine = line.last, asyncio.get_running_loop().create_future()
        line.last = mine
        line.waiting += 1
        try:
            await asyncio.shield(ahead)
            # The one ahead may have left the line cancelled, before the declaration ended.
            await asyncio.shield(declared)
        finally:
            line.waiting -= 1
            if line.waiting == 0 and self._lines.get(device_id) is line:
                del self._lines[device_id]
            mine.set_result(None)

    def _forget_least_recent(self) -> None:
        """Keeps ``declared_cache`` devices, dropping the least recently used first.

        A declaration under way is never dropped: its callers wait in line behind it, and a
        second declaration of the same queue would let a later publish overtake them.
        """
        while len(self._declared) > self._config.declared_cache:
            device_id, declared = next(iter(self._declared.items()))
            if not declared.done():
                return
            del self._declared[device_id]

    def _next_channel(self) -> AbstractChannel:
        self._declarations += 1
        return self._declaring[self._declarations % len(self._declaring)]

    def forget(self, device_id: str, declaration: asyncio.Future[None] | None = None) -> None:
        """Makes the next :meth:`ensure_queue` declare the queue again. Given the
        ``declaration`` a publish went out under (what ``ensure_queue`` returned), only that
        one is forgotten: a later unroutable return must not drop the re-declaration an
        earlier command of the device waits on (a second declaration would let the later
        command overtake it)."""
        if declaration is None or self._declared.get(device_id) is declaration:
            self._declared.pop(device_id, None)

    async def delete_queue(self, device_id: str) -> None:
        """Deletes the device's queue, with the messages in it (a retired device).

        Raises:
            BrokerError: the broker failed or did not answer within ``publish_timeout``.
        """
        name = self._config.queue_name(self._config.validate_device(device_id))
        self.forget(device_id)
        self._devices.pop(device_id, None)
        # Declarations of the device from now on wait for this deletion, and it waits for
        # those under way (and an earlier deletion): see _apart().
        before = [*self._using_now.get(device_id, ()), self._deleting_now.get(device_id)]
        deleting = self._deleting_now[device_id] = asyncio.get_running_loop().create_future()
        try:
            with broker_errors(f"deleting the queue of {device_id!r}"):
                async with asyncio.timeout(self._config.publish_timeout):
                    await _apart([call for call in before if call is not None])
                    await self._on_a_declaring_channel(lambda channel: channel.queue_delete(name))
        finally:
            if self._deleting_now.get(device_id) is deleting:
                del self._deleting_now[device_id]
            deleting.set_result(None)
        logger.info("deleted queue %s", name)

    async def declared_before_write(self, device_id: str) -> bool:
        """Declares the device's queue before a write (cached after): a queue of other settings
        is a clear error with nothing written. False: the broker is down (left to the relay)."""
        try:
            await self.ensure_queue(device_id)
        except BrokerError as exc:
            logger.warning("queue of %s not declared: %s", device_id, exc)
            return False
        return True

    async def declare_queue(
        self, channel: AbstractChannel, device_id: str, *, robust: bool = True
    ) -> AbstractQueue:
        """Declares and binds the device's queue on ``channel`` and returns it.

        On a robust channel a ``robust`` queue (and its consumer) is restored after a
        reconnect.

        Raises:
            QueueMismatch: the queue exists with another type or durability.
            BrokerError: the broker failed.
        """
        # The store validates device ids before anything is written; this stops one that
        # slipped past (a name over 255 bytes) from reaching the broker as a TypeError.
        name = self._config.queue_name(self._config.validate_device(device_id))
        while (deleting := self._deleting_now.get(device_id)) is not None:
            await _apart([deleting])  # and any deletion that began meanwhile
        with self.in_use(device_id):
            return await self._declared_queue(channel, device_id, name, robust)

    @contextlib.contextmanager
    def in_use(self, device_id: str) -> Iterator[None]:
        """Counts a call on the device's queue under way (a declaration): a deletion of the
        queue begun meanwhile waits for it."""
        call = asyncio.get_running_loop().create_future()
        self.in_use_until(device_id, call)
        try:
            yield
        finally:
            call.set_result(None)

    def in_use_until(self, device_id: str, call: asyncio.Future[Any]) -> None:
        """Counts ``call`` on the device's queue (on quorum queues a publish, from its send
        on) until it ends: a deletion of the queue begun meanwhile waits for it. RabbitMQ
        3.10 deleting a quorum queue while a publish to it is in flight closes the
        publishing connection, and sometimes leaves the queue's name undeclarable."""
        self._using_now.setdefault(device_id, set()).add(call)
        call.add_done_callback(functools.partial(self._used, device_id))

    def _used(self, device_id: str, call: asyncio.Future[Any]) -> None:
        calls = self._using_now.get(device_id)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self._using_now[device_id]

    def declared(self, device_id: str, declaration: asyncio.Future[None]) -> bool:
        """Whether ``declaration`` (what :meth:`ensure_queue` returned) still stands: not
        forgotten since, as a deletion of the queue forgets it when it begins."""
        return self._declared.get(device_id) is declaration

    async def _declared_queue(
        self, channel: AbstractChannel, device_id: str, name: str, robust: bool
    ) -> AbstractQueue:
        self._devices[device_id] = None
        self._devices.move_to_end(device_id)
        if len(self._devices) > self._config.declared_cache:
            self._devices.popitem(last=False)
        with queue_declaration(name):
            if isinstance(channel, AbstractRobustChannel):
                await usable(channel)  # reopened after a refusal; not closed for good
                queue: AbstractQueue = await channel.declare_queue(
                    name,
                    durable=self._config.durable,
                    arguments=self.queue_arguments,
                    robust=robust,
                )
            else:
                queue = await channel.declare_queue(
                    name, durable=self._config.durable, arguments=self.queue_arguments
                )
            await usable(channel)
            await queue.bind(self._config.exchange, routing_key=device_id)
        logger.debug("declared queue %s", name)
        return queue


async def _apart(calls: Sequence[asyncio.Future[None]]) -> None:
    """Waits for the calls on a device queue under way (declarations, quorum publishes) or
    its deletion, however they end.

    RabbitMQ (3.10, classic queues) deleting a queue while another channel declares it again
    may leave the deleted queue's consumer on the new queue, never cancelled: the new
    queue's messages go to it unacknowledged and its channel drops them, so a stream on it
    waits for ever. A store's deletion of a device queue and its declarations of it (an
    enqueue racing a retire) therefore reach the broker one after the other.
    """
    if calls:
        await asyncio.wait(calls)  # cancelled, the waiter leaves; the calls run on
