"""Private RabbitMQ nodes (scripts/rabbit-node.sh through tests/private_broker.py): they start,
restart and go away without a trace, and the machine's broker is never a target."""

from __future__ import annotations

import asyncio
import subprocess

import aio_pika
import pytest

from tests.private_broker import (
    SCRIPT,
    PrivateBrokerError,
    private_broker,
    restart_app,
    stop_app,
)
from tests.rabbitmq_support import AMQP_URL


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, check=False)


async def _machine_broker_answers() -> bool:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        return not connection.is_closed


@pytest.mark.parametrize("node", ["rabbit@localhost", "rabbit"])
async def test_the_machine_broker_is_refused_as_a_private_node(node: str) -> None:
    with pytest.raises(PrivateBrokerError, match="no private node rabbit"):
        await restart_app(node, 0)
    with pytest.raises(PrivateBrokerError, match="no private node rabbit"):
        await stop_app(node)

    assert await _machine_broker_answers()


async def test_only_local_node_names_are_taken() -> None:
    with pytest.raises(ValueError, match="not a private node"):
        await restart_app("amqpq-x@otherhost", 0)


@pytest.mark.slow
async def test_a_private_node_keeps_durable_messages_over_an_app_restart_and_leaves_nothing() -> (
    None
):
    async with private_broker() as broker:
        assert broker.node == f"{broker.name}@localhost"
        assert broker.amqp_url == f"amqp://guest:guest@127.0.0.1:{broker.amqp_port}/"
        connection = await aio_pika.connect(broker.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("kept", durable=True)
            await channel.default_exchange.publish(
                aio_pika.Message(b"before", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue.name,
            )

        await restart_app(broker.node, 0.2)

        connection = await aio_pika.connect(broker.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("kept", durable=True)
            message = await queue.get(timeout=5)
            assert message.body == b"before"
            await message.ack()

    status = await asyncio.to_thread(_run_script, "status", broker.name)
    assert status.returncode == 3, status.stdout + status.stderr  # not running
    listing = await asyncio.to_thread(_run_script, "list")
    assert broker.name not in listing.stdout  # and its directory is gone
    assert await _machine_broker_answers()
