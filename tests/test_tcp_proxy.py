"""The fault-test TCP proxy, against the real local broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractQueue, AbstractRobustConnection
from aiormq.exceptions import AMQPConnectionError

from tests.support import eventually, unique
from tests.tcp_proxy import TCPProxy

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
WAIT = 5.0


@pytest.fixture
async def proxy() -> AsyncIterator[TCPProxy]:
    async with TCPProxy() as started:
        yield started


@pytest.fixture
async def direct() -> AsyncIterator[AbstractConnection]:
    """A connection straight to the broker, for setup and checks the proxy must not affect."""
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        yield connection


@pytest.fixture
async def queue(direct: AbstractConnection) -> AsyncIterator[AbstractQueue]:
    """A uniquely named queue that outlives client connections; deleted afterwards."""
    channel = await direct.channel()
    declared = await channel.declare_queue(unique("test-proxy-"), auto_delete=False)
    yield declared
    await declared.delete(if_unused=False, if_empty=False)
    await channel.close()


def connection_lost(connection: AbstractConnection) -> asyncio.Future[BaseException | None]:
    """Resolves, with the reason, when the client notices its connection is gone."""
    lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def on_close(_sender: object, reason: BaseException | None) -> None:
        if not lost.done():
            lost.set_result(reason)

    connection.close_callbacks.add(on_close)
    return lost


async def get_body(queue: AbstractQueue) -> bytes:
    message = await queue.get(timeout=WAIT, fail=True)
    assert message is not None
    await message.ack()
    return message.body


async def test_proxy_listens_on_an_ephemeral_loopback_port(proxy: TCPProxy) -> None:
    assert proxy.port > 0
    assert proxy.amqp_url == f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


async def test_connection_through_proxy_publishes_and_gets_a_message(proxy: TCPProxy) -> None:
    async with await aio_pika.connect(proxy.amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(unique("test-proxy-"), exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"through"), queue.name)

        assert await get_body(queue) == b"through"
        await queue.delete()
    assert proxy.connection_count == 0


async def test_cut_closes_the_clients_open_connection(proxy: TCPProxy) -> None:
    connection = await aio_pika.connect(proxy.amqp_url)
    try:
        lost = connection_lost(connection)
        channel = await connection.channel()

        await proxy.cut()

        reason = await asyncio.wait_for(lost, WAIT)
        assert isinstance(reason, AMQPConnectionError)
        assert not connection.connected.is_set()
        assert channel.is_closed
        assert proxy.connection_count == 0
    finally:
        await connection.close()


async def test_new_connections_fail_while_cut_and_succeed_after_restore(proxy: TCPProxy) -> None:
    await proxy.cut()

    with pytest.raises(ConnectionError):
        await aio_pika.connect(proxy.amqp_url, timeout=WAIT)

    await proxy.restore()
    connection = await aio_pika.connect(proxy.amqp_url, timeout=WAIT)
    await connection.close()


async def test_cut_leaves_direct_connections_alone(
    proxy: TCPProxy, direct: AbstractConnection, queue: AbstractQueue
) -> None:
    await proxy.cut()

    channel = await direct.channel()
    await channel.default_exchange.publish(aio_pika.Message(b"direct"), queue.name)
    assert await get_body(queue) == b"direct"
    await channel.close()


async def test_robust_connection_recovers_after_restore_and_publishes_again(
    proxy: TCPProxy, queue: AbstractQueue
) -> None:
    connection: AbstractRobustConnection = await aio_pika.connect_robust(
        proxy.amqp_url, reconnect_interval=0.5
    )
    try:
        lost = connection_lost(connection)
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda _sender: reconnected.set())
        channel = await connection.channel()
        await channel.default_exchange.publish(aio_pika.Message(b"before"), queue.name)
        assert await get_body(queue) == b"before"

        await proxy.cut()
        await asyncio.wait_for(lost, WAIT)
        # Several reconnect attempts fail against the cut proxy before it is restored.
        dropped = proxy.dropped

        async def tried_again_twice() -> bool:
            return proxy.dropped >= dropped + 2

        await eventually(tried_again_twice, WAIT)
        assert not reconnected.is_set()
        await proxy.restore()

        await asyncio.wait_for(reconnected.wait(), WAIT)
        await channel.default_exchange.publish(aio_pika.Message(b"after"), queue.name)
        assert await get_body(queue) == b"after"
    finally:
        await connection.close()


async def test_close_drops_connections_and_stops_listening() -> None:
    proxy = TCPProxy()
    await proxy.start()
    url = proxy.amqp_url
    connection = await aio_pika.connect(url)
    lost = connection_lost(connection)

    await proxy.close()

    await asyncio.wait_for(lost, WAIT)
    await connection.close()
    with pytest.raises(ConnectionError):
        await aio_pika.connect(url, timeout=WAIT)


def test_proxy_rejects_a_port_that_is_not_a_tcp_port() -> None:
    with pytest.raises(ValueError, match="not a TCP port"):
        TCPProxy(target_port=70000)
