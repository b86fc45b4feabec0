"""Per-device order when the broker nacks one publish and confirms a later one.

Across a quorum queue's leader change (its node killed) RabbitMQ 3.10 nacks some publishes
to a device queue while it confirms later ones to the same queue on the same channel. Sent
while the earlier one was unconfirmed, the later command is in the queue before the earlier
one is published again: the device gets them out of order. So on quorum queues a device has
one publish in flight at a time, and a command whose predecessor failed is not sent; classic
queues keep many in flight. A fake channel plays the broker: it records what reaches the
queue, and nacks the first publish only once the test lets it answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from aiormq.exceptions import DeliveryError
from pamqp import commands as spec

from amqp_queue import BrokerError, MemoryStore, QueueType, RabbitMQConfig
from amqp_queue.publisher import Publisher
from amqp_queue.state.clock import utc_now
from amqp_queue.state.model import CommandRecord


class _Broker:
    """A confirming channel whose answer to each publish the test decides."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.queue: list[bytes] = []
        self.nack: set[bytes] = set()
        self.answer = asyncio.Event()
        self.is_closed = False
        self.in_use: Counter[str] = Counter()  # by device: Topology.in_use under way
        self.in_use_when_sent: list[bool] = []

    async def get_underlay_channel(self) -> _Broker:
        return self

    @property
    def connection(self) -> SimpleNamespace:
        """The connection a publish is raced against (it never closes here)."""
        if not hasattr(self, "_connection"):
            self._connection = SimpleNamespace(closing=asyncio.get_running_loop().create_future())
        return self._connection

    async def basic_publish(self, body: bytes, routing_key: str = "", **_: Any) -> spec.Basic.Ack:
        self.sent.append(body)
        self.in_use_when_sent.append(routing_key in self.in_use)
        if body in self.nack:
            await self.answer.wait()
            raise DeliveryError(None, spec.Basic.Nack())
        self.queue.append(body)
        return spec.Basic.Ack()


class _Topology:
    def __init__(self, broker: _Broker) -> None:
        self.channel = broker

    async def ensure_queue(self, device_id: str) -> None:
        pass

    def declared(self, device_id: str, declaration: object) -> bool:
        return True

    def in_use_until(self, device_id: str, call: asyncio.Future[Any]) -> None:
        self.channel.in_use[device_id] += 1
        call.add_done_callback(lambda _: self._used(device_id))

    def _used(self, device_id: str) -> None:
        self.channel.in_use[device_id] -= 1
        if not self.channel.in_use[device_id]:
            del self.channel.in_use[device_id]


def _publisher(queue_type: QueueType) -> tuple[Publisher, _Broker]:
    broker = _Broker()
    config = RabbitMQConfig(exchange="test.order", queue_type=queue_type)
    return Publisher(_Topology(broker), config, utc_now), broker  # type: ignore[arg-type]


def _commands(device: str, count: int) -> list[CommandRecord]:
    store = MemoryStore()
    return [store.build(device, None, f"{device}/{n}".encode(), 60) for n in range(count)]


async def _answer_later(broker: _Broker) -> None:
    for _ in range(20):  # long enough for every publish that may be sent to be sent
        await asyncio.sleep(0)
    broker.answer.set()


async def test_on_quorum_queues_a_command_is_not_sent_before_the_earlier_one_is_confirmed() -> None:
    publisher, broker = _publisher(QueueType.QUORUM)
    first, second, third = _commands("dev-1", 3)
    (other,) = _commands("dev-2", 1)
    broker.nack.add(first.payload)

    results = await asyncio.gather(
        publisher.publish(first),
        publisher.publish(second),
        publisher.publish(other),
        publisher.publish(third),
        _answer_later(broker),
        return_exceptions=True,
    )

    # The nacked command's successors were not sent; another device's command was.
    assert all(isinstance(result, BrokerError) for result in results[:2]), results
    assert results[2] is True
    assert isinstance(results[3], BrokerError)
    assert broker.sent == [first.payload, other.payload]
    assert broker.queue == [other.payload]
    # Published again in order (as the relay does), the device's queue holds them in order.
    broker.nack.clear()
    assert await asyncio.gather(*(publisher.publish(c) for c in (first, second, third))) == [
        True,
        True,
        True,
    ]
    assert [body for body in broker.queue if body.startswith(b"dev-1")] == [
        first.payload,
        second.payload,
        third.payload,
    ]


@pytest.mark.parametrize("queue_type", list(QueueType))
async def test_a_command_refused_for_good_does_not_hold_back_the_next(
    queue_type: QueueType,
) -> None:
    publisher, broker = _publisher(queue_type)
    first, second = _commands("dev-1", 2)
    expired = dataclasses.replace(first, expires_at=utc_now())
    results = await asyncio.gather(publisher.publish(expired), publisher.publish(second))
    assert list(results) == [False, True]
    assert broker.queue == [second.payload]


async def test_on_classic_queues_publishes_to_one_device_stay_concurrent() -> None:
    publisher, broker = _publisher(QueueType.CLASSIC)
    first, second = _commands("dev-1", 2)
    broker.nack.add(first.payload)
    results = await asyncio.gather(
        publisher.publish(first),
        publisher.publish(second),
        _answer_later(broker),
        return_exceptions=True,
    )
    assert broker.sent == [first.payload, second.payload]  # both in flight at once
    assert isinstance(results[0], BrokerError)
    assert results[1] is True


async def test_on_quorum_queues_a_publish_is_in_use_of_its_queue_while_it_is_sent() -> None:
    """A retire's deletion of the queue waits for it (Topology.in_use): RabbitMQ 3.10
    deleting a quorum queue with a publish to it in flight closes the publishing connection,
    and sometimes leaves the queue's name undeclarable until the broker restarts (a helper's
    probe, 3 of 8 runs). Classic queues need no turn for a publish."""
    for queue_type, expected in ((QueueType.QUORUM, True), (QueueType.CLASSIC, False)):
        publisher, broker = _publisher(queue_type)
        await asyncio.gather(*(publisher.publish(r) for r in _commands("dev-1", 3)))
        assert broker.in_use_when_sent == [expected] * 3, queue_type
        assert not broker.in_use
