"""An enqueue returns while the broker is unreachable, also for a device never seen before."""

from __future__ import annotations

import asyncio
from pathlib import Path

from amqp_queue import CommandStatus, RabbitMQConfig, RabbitMQStore
from tests.rabbitmq_support import delete_namespace
from tests.support import unique
from tests.tcp_proxy import TCPProxy


async def test_enqueue_for_a_new_device_returns_during_an_outage_and_is_delivered_after(
    tmp_path: Path,
) -> None:
    exchange = unique("test.")
    config = RabbitMQConfig(exchange=exchange, publish_timeout=1.0)
    async with TCPProxy() as proxy:
        store = await RabbitMQStore.connect(
            f"{proxy.amqp_url}?reconnect_interval=0.2",
            state_url=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
            config=config,
        )
        try:
            await store.enqueue("known", b"before", 600)
            await proxy.cut()
            async with asyncio.timeout(config.publish_timeout * 3):
                command_id = await store.enqueue("new-device", b"during", 600)
                unlock = await store.enqueue_with_confirmation("newer", "unlock", b"door", 600)
                await store.confirm_command(unlock)
            assert await store.get_status(command_id) == CommandStatus.PENDING

            await proxy.restore()
            delivered: list[bytes] = []
            async with asyncio.timeout(20):
                while len(delivered) < 2:
                    delivered += await store.drain_pending("new-device")
                    delivered += await store.drain_pending("newer")
                    await asyncio.sleep(0.1)
            assert sorted(delivered) == [b"door", b"during"]
            assert await store.get_status(command_id) == CommandStatus.DELIVERED
        finally:
            await store.close()
            await delete_namespace(exchange, ["known", "new-device", "newer"])
