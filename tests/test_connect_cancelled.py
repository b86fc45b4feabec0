"""``RabbitMQStore.connect()`` cut short by its caller (a deadline, ``Task.cancel``).

Found by a helper's public-API probe: a connect cancelled while its AMQP connection was
being made left that connection open on the broker, with its reader, writer, heartbeat and
reconnect tasks, for the life of the process (2 to 17 of 20 cut connects a run). A cut
connect now closes what it opened.
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess

from amqp_queue import RabbitMQConfig, RabbitMQStore
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique


def _open_connections(tag: str) -> set[str]:
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(re.findall(tag + r"-\d+", listed))


async def test_a_cut_connect_leaves_no_connection_behind() -> None:
    tag, exchange = unique("cut-connect-"), unique("test.")
    rnd = random.Random(9)
    cut: set[str] = set()
    tasks_before = asyncio.all_tasks()
    try:
        for n in range(20):
            url = f"{AMQP_URL.rstrip('/')}/?name={tag}-{n}"
            connecting = RabbitMQStore.connect(
                url, state_url="memory://", config=RabbitMQConfig(exchange=exchange)
            )
            try:
                store = await asyncio.wait_for(connecting, rnd.uniform(0.0, 0.05))
            except TimeoutError:
                cut.add(f"{tag}-{n}")
                continue
            await store.close()
        await asyncio.sleep(1)  # what a connection runs has its turn to end
        assert cut, "no connect was cut short"
        assert not _open_connections(tag) & cut
        assert not [task for task in asyncio.all_tasks() - tasks_before if not task.done()]
    finally:
        await delete_namespace(exchange, [])
