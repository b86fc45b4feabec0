"""close() of a store whose broker link is stalled (every byte held, no reset, as a dead
peer before TCP gives up), with nothing in flight. docs/delivery.md ("Closing") says broker
calls made while closing are bounded by ``publish_timeout``. Found by a helper's probe: the
store closed its channels one after another, each waiting its own ``publish_timeout`` (its
publishing channel and each of ``declare_channels`` declaring ones), so with the defaults
(10 s, 4 declaring channels) a close on a stalled link took about 52 s."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from amqp_queue import RabbitMQConfig, RabbitMQStore
from tests.rabbitmq_support import delete_namespace
from tests.support import unique
from tests.tcp_proxy import StallProxy

pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]
PUBLISH_TIMEOUT = 2.0


@pytest.mark.parametrize("backend", ["sqlite"])  # the broker side: any state
async def test_close_on_a_stalled_broker_link_is_bounded_by_publish_timeout(
    backend: str, tmp_path: Path
) -> None:
    from tests.test_adversarial_seams import state_url_for

    exchange = unique("close-stalled.")
    devices = [unique("d") for _ in range(4)]
    async with state_url_for(backend, tmp_path) as url, StallProxy(5672) as proxy:
        store = await RabbitMQStore.connect(
            proxy.amqp_url,
            state_url=url,
            config=RabbitMQConfig(exchange=exchange, publish_timeout=PUBLISH_TIMEOUT),
        )
        try:
            # first commands to a few devices: their queues are declared (declare channels)
            await asyncio.gather(*(store.enqueue(d, b"x", 600) for d in devices))
            proxy.stall()
            started = time.monotonic()
            await asyncio.wait_for(store.close(), 120)
            took = time.monotonic() - started
        finally:
            proxy.resume()
            await store.close()
            await delete_namespace(exchange, devices)
    # nothing in flight: one publish_timeout for the broker calls, and a margin for the
    # connection's own close
    assert took < 2 * PUBLISH_TIMEOUT + 3, (
        f"close() on a stalled broker link took {took:.1f} s with publish_timeout "
        f"{PUBLISH_TIMEOUT} s"
    )
