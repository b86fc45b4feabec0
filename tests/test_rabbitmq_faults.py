"""RabbitMQStore through restarts and broker faults: nothing accepted is lost or repeated."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from amqp_queue import CommandStatus, PendingCommand, RabbitMQConfig, RabbitMQStore
from tests.backends import REDIS_URL, redis_prefix
from tests.rabbitmq_support import AMQP_URL, delete_namespace, rabbitmq_store
from tests.support import unique
from tests.tcp_proxy import TCPProxy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "redis"])
async def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A durable state index two processes can share: a SQLite file, or a Redis prefix."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
        return
    async with redis_prefix() as prefix:
        yield f"{REDIS_URL}?prefix={prefix}"


async def test_a_second_process_on_the_same_state_carries_on(
    tmp_path: Path, state_url: str
) -> None:
    async with rabbitmq_store(tmp_path, state_url=state_url) as first:
        await first.enqueue("dev-1", b"plain", 600)
        stale = await first.enqueue_or_update("dev-1", "setpoint", b"20", 600)
        unlock = await first.enqueue_with_confirmation("dev-1", "unlock", b"door", 600)
        exchange = first.config.exchange

        child = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tests.restart_child", AMQP_URL, state_url, exchange],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert child.returncode == 0, child.stderr
        result = json.loads(child.stdout)

        assert result["confirmations"] == [unlock]
        assert result["first_drain"] == ["plain", "21", "door"]
        assert result["second_drain"] == []
        assert await first.get_status(stale) == CommandStatus.SUPERSEDED
        assert await first.get_status(result["replacement"]) == CommandStatus.DELIVERED
        assert await first.drain_pending("dev-1") == []


async def test_enqueue_succeeds_while_the_broker_is_unreachable_and_delivers_after(
    tmp_path: Path,
) -> None:
    exchange = unique("test.")
    async with TCPProxy() as proxy:
        url = f"{proxy.amqp_url}?reconnect_interval=0.3"
        config = RabbitMQConfig(exchange=exchange, publish_timeout=1.0)
        store = await RabbitMQStore.connect(
            url, state_url=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}", config=config
        )
        try:
            before = await store.enqueue("dev-1", b"before", 600)
            await proxy.cut()
            during = [
                await store.enqueue("dev-1", b"during-1", 600),
                await store.enqueue_or_update("dev-1", "setpoint", b"during-2", 600),
            ]
            assert [c.id for c in await store.get_pending("dev-1")] == [before, *during]

            await proxy.restore()
            received = await _drain_until(store, "dev-1", count=3, seconds=20)
            assert received == [b"before", b"during-1", b"during-2"]
            assert await store.drain_pending("dev-1") == []
        finally:
            await store.close()
            await delete_namespace(exchange, ["dev-1"])


async def test_consume_resumes_after_the_broker_closes_the_connection(tmp_path: Path) -> None:
    exchange = unique("test.")
    name = unique("amqp-queue-test-")
    store = await RabbitMQStore.connect(
        f"{AMQP_URL}?name={name}&reconnect_interval=0.3",
        state_url=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        config=RabbitMQConfig(exchange=exchange, publish_timeout=2.0),
    )
    received: list[PendingCommand] = []

    async def device() -> None:
        async with store.consume("dev-1") as stream:
            async for command in stream:
                received.append(command)
                if len({c.id for c in received}) == 10:
                    return

    try:
        sent = [await store.enqueue("dev-1", f"{n}".encode(), 600) for n in range(5)]
        consumer = asyncio.create_task(device())
        await _until(lambda: len(received) >= 5, seconds=10)

        await asyncio.to_thread(_close_connections_named, name)
        for n in range(5, 10):
            sent.append(await store.enqueue("dev-1", f"{n}".encode(), 600))

        await asyncio.wait_for(consumer, 30)
        assert [c.id for c in received] == sent, [c.payload for c in received]
        assert [await store.get_status(command_id) for command_id in sent] == [
            CommandStatus.DELIVERED
        ] * 10
    finally:
        await store.close()
        await delete_namespace(exchange, ["dev-1"])


async def _drain_until(
    store: RabbitMQStore, device_id: str, *, count: int, seconds: float
) -> list[bytes]:
    received: list[bytes] = []
    async with asyncio.timeout(seconds):
        while len(received) < count:
            received += await store.drain_pending(device_id)
            await asyncio.sleep(0.2)
    return received


async def _until(condition: Callable[[], bool], *, seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - polls state another task changes
            await asyncio.sleep(0.05)


def _close_connections_named(name: str) -> None:
    """Closes, server side, the broker connections whose client gave this name."""
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    pids = [line.split("\t", 1)[0] for line in listing.splitlines() if name in line]
    assert pids, f"no broker connection named {name}"
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "fault test"],
            check=True,
            capture_output=True,
            timeout=30,
        )
