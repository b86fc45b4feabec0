"""A store's ``close()`` while its ``consume()`` loops work on a command whose stream holds
more in its prefetch window: each loop ends when its body asks for the next command.

Found probing this session: a stream handed out its whole window after close() began (only
an empty window ended it), for up to the 2 s grace: 60 of 100 commands of 20 devices went
out after the close started, and those whose bodies still ran at the grace came again from
the next store (11 in one run). Two closes at once end the store as one does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from amqp_queue import RabbitMQConfig, RabbitMQStore
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique

DEVICES = [f"dev-{n}" for n in range(10)]


async def test_a_loop_asking_for_the_next_command_after_close_ends(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    config = RabbitMQConfig(exchange=unique("test."))
    store = await RabbitMQStore.connect(AMQP_URL, state_url=url, config=config)
    try:
        ids = [await store.enqueue("dev-1", f"c{n}".encode(), 600) for n in range(5)]
        handed: list[str] = []
        working = asyncio.Event()

        async def device() -> None:
            async with store.consume("dev-1") as stream:
                async for command in stream:
                    handed.append(command.id)
                    working.set()
                    await asyncio.sleep(0.3)

        consumer = asyncio.create_task(device())
        async with asyncio.timeout(20):
            await working.wait()
        await store.close()
        await consumer
        assert handed == ids[:1]

        async with await RabbitMQStore.connect(AMQP_URL, state_url=url, config=config) as again:
            assert await again.drain_pending("dev-1") == [b"c1", b"c2", b"c3", b"c4"]
    finally:
        await store.close()
        await delete_namespace(config.exchange, ["dev-1"])


async def test_two_closes_at_once_keep_the_marks_of_bodies_finishing_in_the_grace(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    config = RabbitMQConfig(exchange=unique("test."))
    store = await RabbitMQStore.connect(AMQP_URL, state_url=url, config=config)
    try:
        ids = {device: await store.enqueue(device, b"c", 600) for device in DEVICES}
        handed: list[str] = []
        working = asyncio.Event()

        async def device(device_id: str) -> None:
            async with store.consume(device_id) as stream:
                async for command in stream:
                    handed.append(command.id)
                    if len(handed) == len(DEVICES):
                        working.set()
                    await asyncio.sleep(1.0)  # the device works through the close

        streams = [asyncio.create_task(device(d)) for d in DEVICES]
        async with asyncio.timeout(20):
            await working.wait()
        await asyncio.gather(store.close(), store.close())
        await asyncio.gather(*streams)
        assert sorted(handed) == sorted(ids.values())

        async with await RabbitMQStore.connect(AMQP_URL, state_url=url, config=config) as again:
            again_handed = [await again.drain_pending(d) for d in DEVICES]
        assert again_handed == [[]] * len(DEVICES)
    finally:
        await store.close()
        await delete_namespace(config.exchange, DEVICES)
