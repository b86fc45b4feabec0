"""A drain process that dies between its claim and its hand-over (``os._exit``, as a kill).

``python -m tests.drain_dies_child AMQP_URL STATE_URL EXCHANGE DEVICE [stdin]``: prints
``claimed N`` once its claim of the device's N commands committed, then (with ``stdin``: once
a line comes on its standard input) ends at once, its channel's messages unacked (the broker
requeues them) and its claim left in the index.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence

from amqp_queue import RabbitMQConfig, RabbitMQStore
from amqp_queue.state.model import CommandRecord


async def spawn(
    amqp_url: str, state_url: str, exchange: str, device: str, *, hold: bool = False
) -> asyncio.subprocess.Process:
    """Starts this child on ``device`` (stdout piped; with ``hold``, stdin too)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.drain_dies_child",
        amqp_url,
        state_url,
        exchange,
        device,
        *(["stdin"] if hold else []),
        stdin=asyncio.subprocess.PIPE if hold else None,
        stdout=asyncio.subprocess.PIPE,
    )


async def main(amqp_url: str, state_url: str, exchange: str, device: str, hold: bool) -> None:
    store = await RabbitMQStore.connect(
        amqp_url, state_url=state_url, config=RabbitMQConfig(exchange=exchange)
    )

    async def dies(claimed: Sequence[CommandRecord]) -> list[CommandRecord]:
        print(f"claimed {len(claimed)}", flush=True)
        if hold:
            await asyncio.to_thread(sys.stdin.readline)
        os._exit(9)

    store.state.hand_over = dies  # type: ignore[method-assign]
    await store.drain_pending(device)


if __name__ == "__main__":
    amqp_url, state_url, exchange, device = sys.argv[1:5]
    hold = sys.argv[5:6] == ["stdin"]
    asyncio.run(main(amqp_url, state_url, exchange, device, hold))
