"""Many streams on one store: channels spread over connections, a limit fails one call only.

RabbitMQ closes a whole connection that opens one channel more than its ``channel_max``, and
every stream and the publishing channel on it die with it. The store spreads streams and
drains over as many connections as they need, up to ``max_connections``; one call beyond that
fails by itself.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from amqp_queue import BrokerError, PendingCommand, RabbitMQStore
from amqp_queue.stream import CommandStream
from tests.private_broker import private_broker
from tests.rabbitmq_support import rabbitmq_store

PER_CONNECTION = 4
CONNECTIONS = 3


async def _next(stream: CommandStream) -> PendingCommand:
    async with asyncio.timeout(10):
        return await anext(stream)


async def _open_streams(
    store: RabbitMQStore, stack: AsyncExitStack, devices: list[str]
) -> list[CommandStream]:
    return [await stack.enter_async_context(store.consume(device)) for device in devices]


async def test_streams_spread_over_connections_and_one_too_many_fails_alone(
    tmp_path: Path,
) -> None:
    async with rabbitmq_store(
        tmp_path, channels_per_connection=PER_CONNECTION, max_connections=CONNECTIONS
    ) as store:
        devices = [f"dev-{n}" for n in range(PER_CONNECTION * CONNECTIONS)]
        async with AsyncExitStack() as stack:
            streams = await _open_streams(store, stack, devices)
            assert store._channels.connections == CONNECTIONS

            with pytest.raises(BrokerError, match="streams and drains are open at once"):
                async with store.consume("one-too-many"):
                    pass
            with pytest.raises(BrokerError, match="streams and drains are open at once"):
                await store.drain_pending("one-too-many")

            # Every stream, and the publishing side, still work.
            for device in devices:
                await store.enqueue(device, device.encode(), 600)
            got = await asyncio.gather(*(_next(stream) for stream in streams))
            assert [command.payload for command in got] == [d.encode() for d in devices]

        # Closed streams give their channels back.
        await store.enqueue("dev-0", b"again", 600)
        async with AsyncExitStack() as stack:
            streams = await _open_streams(store, stack, devices)
            assert (await _next(streams[0])).payload == b"again"


@pytest.mark.slow
async def test_a_broker_with_a_low_channel_max_serves_more_streams_than_it_allows(
    tmp_path: Path,
) -> None:
    """The limit the broker negotiated counts, not only the configured one: on a node whose
    channel_max is 12, forty streams run over several connections and all get commands."""
    async with (
        private_broker(extra_conf="channel_max = 12") as broker,
        rabbitmq_store(tmp_path, amqp_url=broker.amqp_url) as store,
        AsyncExitStack() as stack,
    ):
        devices = [f"dev-{n}" for n in range(40)]
        streams = await _open_streams(store, stack, devices)
        for device in devices:
            await store.enqueue(device, device.encode(), 600)
        got = await asyncio.gather(*(_next(stream) for stream in streams))
        assert [command.payload for command in got] == [d.encode() for d in devices]
        assert store._channels.connections >= 4
