"""One of two store processes sharing a PostgreSQL index and a cluster (tests/test_cluster.py).

    python -m tests.cluster_child enqueue AMQP_URLS STATE_URL EXCHANGE DEVICE COUNT
        enqueues COUNT commands for DEVICE, keeps its outbox relay running a few seconds, and
        prints the ids as one JSON list
    python -m tests.cluster_child consume AMQP_URLS STATE_URL EXCHANGE DEVICE COUNT SECONDS
        prints "ready" once its stream is open, then consumes DEVICE's commands until COUNT
        distinct ones came or SECONDS passed (and a second more, to catch any copy), and prints
        every id handed out, repeats included, as one JSON list

Both run the store's relay (relay_interval=0.5), so both may try to publish a command the
other wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

from amqp_queue import QueueType, RabbitMQConfig, RabbitMQStore


def _config(exchange: str) -> RabbitMQConfig:
    return RabbitMQConfig(
        exchange=exchange, queue_type=QueueType.QUORUM, relay_interval=0.5, publish_timeout=3.0
    )


async def enqueue(amqp_urls: str, state_url: str, exchange: str, device: str, count: int) -> None:
    async with await RabbitMQStore.connect(
        amqp_urls, state_url=state_url, config=_config(exchange)
    ) as store:
        ids = [await store.enqueue(device, f"command {i}".encode(), 600) for i in range(count)]
        await asyncio.sleep(2.0)  # the relay runs a few passes
    sys.stdout.write(json.dumps(ids) + "\n")


async def consume(
    amqp_urls: str, state_url: str, exchange: str, device: str, count: int, seconds: float
) -> None:
    handed: list[str] = []
    async with await RabbitMQStore.connect(
        amqp_urls, state_url=state_url, config=_config(exchange)
    ) as store:
        await store.ensure_queue(device)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        async with store.consume(device) as stream:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    async for command in stream:
                        handed.append(command.id)
                        if len(set(handed)) >= count:
                            break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    async for command in stream:
                        handed.append(command.id)
    sys.stdout.write(json.dumps(handed) + "\n")


if __name__ == "__main__":
    role, urls, state, exchange_name, device_id, how_many = sys.argv[1:7]
    if role == "enqueue":
        asyncio.run(enqueue(urls, state, exchange_name, device_id, int(how_many)))
    else:
        asyncio.run(
            consume(urls, state, exchange_name, device_id, int(how_many), float(sys.argv[7]))
        )
