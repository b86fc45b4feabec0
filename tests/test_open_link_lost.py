"""A stream or drain whose connection dies while it opens its consumer.

A running stream survives its connection dying (the store reconnects and its consumer comes
back); a stream whose consumer was being set up at that moment failed instead, with
``BrokerError``. Seen on RabbitMQ 3.10 with quorum queues: the broker closes the whole
connection with ``INTERNAL_ERROR`` when a consume reaches a quorum queue before its Raft
member runs (rabbitmq-server#13625), and every stream opening on that connection failed.
Here the link dies as the broker's answer to ``basic.consume`` comes back
(:class:`~tests.tcp_proxy.LosesAnswer`): the call opens again on the new connection and
hands out the device's command, once.
"""

from __future__ import annotations

import pytest

from amqp_queue import RabbitMQConfig, RabbitMQStore
from tests.rabbitmq_support import delete_namespace
from tests.support import unique
from tests.tcp_proxy import BROKER_PORT, LosesAnswer

pytestmark = pytest.mark.timeout(60)

BASIC_CONSUME = b"\x00\x3c\x00\x14"
"""The method header of ``basic.consume`` (class 60, method 20) in a method frame."""


@pytest.mark.parametrize("reader", ["consume", "drain"])
async def test_a_call_whose_link_dies_as_its_consumer_opens_opens_again(
    tmp_path: object, reader: str
) -> None:
    exchange = unique("test.")
    async with LosesAnswer(BROKER_PORT) as proxy:
        store = await RabbitMQStore.connect(
            f"{proxy.amqp_url}?reconnect_interval=0.2",
            state_url=f"sqlite+aiosqlite:///{tmp_path}/index.db",
            config=RabbitMQConfig(exchange=exchange, publish_timeout=5.0),
        )
        device = "gw-1"
        try:
            async with store:
                command_id = await store.enqueue(device, b"reboot", ttl=60)
                proxy.arm(BASIC_CONSUME)
                if reader == "consume":
                    async with store.consume(device) as commands:
                        received = [(await anext(commands)).id]
                else:
                    received = [c.id for c in await store.drain_commands(device)]
                assert proxy.lost.is_set(), "the consumer's answer was never lost"
                assert received == [command_id]
                assert await store.drain_pending(device) == []
        finally:
            await delete_namespace(exchange, [device])
