"""The sidecar comes up during a broker outage and catches up when the broker appears.

A sidecar restarted while its broker is down must not exit: it answers ``/healthz`` with 503
naming the broker, takes enqueues into the index at once (the broker is known to be down, so
nothing waits for a declaration's timeout), and its outbox relay publishes them, in order, once
the connection is up. The outage is a TCP proxy that drops every connection until restored.
"""

from __future__ import annotations

import time
from pathlib import Path

from aiormq.exceptions import ChannelNotFoundEntity

from amqp_queue import CommandStatus
from tests.api_support import running
from tests.rabbitmq_support import queue_depth
from tests.support import eventually
from tests.tcp_proxy import TCPProxy


async def test_serve_starts_without_its_broker_and_relays_once_it_appears(
    tmp_path: Path,
) -> None:
    async with TCPProxy() as proxy:
        await proxy.cut()
        url = f"{proxy.amqp_url}?reconnect_interval=0.2"
        started = time.monotonic()
        async with running(tmp_path, amqp_url=url) as api:
            assert time.monotonic() - started < 8  # up, not waiting out the outage

            health = await api.client.get("/healthz")
            assert health.status_code == 503
            assert health.json()["broker"].startswith("unreachable")
            assert health.json()["state"] == "ok"

            sent = time.monotonic()
            first = await api.enqueue("dev-1", payload="first")
            second = await api.enqueue("dev-1", payload="second")
            assert (first.status_code, second.status_code) == (201, 201)
            assert time.monotonic() - sent < 2  # known down: no declaration timeout
            ids = [first.json()["id"], second.json()["id"]]
            store = api.backends.store
            assert [await store.get_status(i) for i in ids] == [CommandStatus.PENDING] * 2

            await proxy.restore()

            async def healthy() -> bool:
                return (await api.client.get("/healthz")).status_code == 200

            async def both_queued() -> bool:
                try:
                    return await queue_depth(store, "dev-1") == 2
                except ChannelNotFoundEntity:
                    return False  # healthy before the relay declared the queue: not yet

            await eventually(healthy, 20)
            await eventually(both_queued, 20)
            assert await store.drain_pending("dev-1") == [b"first", b"second"]
            assert await queue_depth(store, "dev-1") == 0
