"""Network and broker faults during enqueue and consume storms, in the harness's own process.

A producer store and a device store (separate connections, one shared state index) run flat
out while faults are injected: the TCP proxy in front of both is cut and restored, the broker
closes their connections server side (``rabbitmqctl close_connection``), or the broker app is
restarted (``rabbitmqctl stop_app/start_app``). A restart storm runs on a private RabbitMQ node
of its own (tests/private_broker.py), started for the trial and removed after it: the
machine's broker, which other tests and clients share, is never restarted. Afterwards every
command a device must get has to arrive, nothing stale may, and the outbox must drain.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from amqp_queue import RabbitMQStore
from tests.faults.broker import close_connections_named
from tests.faults.crash import statuses_of
from tests.faults.ledger import Tally, judge, required_keys
from tests.faults.states import fresh_state, rabbitmq_on
from tests.faults.workload import MemoryRecorder, Producer, consume_forever, trial_config
from tests.private_broker import private_broker, restart_app
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique
from tests.tcp_proxy import BROKER_PORT, TCPProxy

FAULTS = ("proxy-cut", "server-close", "broker-restart")
DEVICES = 3

Inject = Callable[[], Awaitable[None]]


async def _until(condition: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if await condition():
            return True
        await asyncio.sleep(0.1)
    return False


@asynccontextmanager
async def _broker_for(fault: str) -> AsyncIterator[tuple[str, str | None]]:
    """The broker a storm runs on: its AMQP URL and, for a restart storm, the private node's
    name (the only node ``rabbitmqctl -n`` may restart)."""
    if fault == "broker-restart":
        async with private_broker() as broker:
            yield broker.amqp_url, broker.node
    else:
        yield AMQP_URL, None


def _injector(
    fault: str, rng: random.Random, proxy: TCPProxy, names: list[str], node: str | None
) -> Inject:
    async def cut() -> None:
        await proxy.cut()
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        await proxy.restore()

    async def close() -> None:
        # Either side alone, or both at once.
        chosen = rng.choice([names[:1], names[1:], names])
        await asyncio.to_thread(close_connections_named, *chosen)

    async def restart() -> None:
        if node is None:
            raise RuntimeError("a broker restart needs a private node")
        await restart_app(node, rng.uniform(0.5, 2.0))

    return {"proxy-cut": cut, "server-close": close, "broker-restart": restart}[fault]


async def storm_trial(
    fault: str, rng: random.Random, state_kind: str, directory: Path, *, seconds: float = 3.0
) -> Tally:
    """One storm of ``seconds`` with ``fault`` injected at random moments (a broker restart
    once), then recovery; returns the judged tally."""
    exchange = unique("faults.")
    devices = [f"gw-{n}" for n in range(DEVICES)]
    names = [unique("faults-producer-"), unique("faults-device-")]
    recorder = MemoryRecorder()
    async with (
        fresh_state(state_kind, directory) as spec,
        _broker_for(fault) as (broker_url, node),
        TCPProxy(urlsplit(broker_url).port or BROKER_PORT) as proxy,
    ):
        base = proxy.amqp_url if fault == "proxy-cut" else broker_url
        urls = [f"{base}?name={name}&reconnect_interval=0.2" for name in names]
        config = trial_config(exchange)
        try:
            async with (
                rabbitmq_on(spec, urls[0], config) as producer_store,
                rabbitmq_on(spec, urls[1], config) as device_store,
            ):
                inject = _injector(fault, rng, proxy, names, node)
                outbox_left = await storm(
                    producer_store,
                    device_store,
                    devices,
                    recorder,
                    inject,
                    rng,
                    seconds,
                    once=fault == "broker-restart",
                )
                statuses = await statuses_of(producer_store, recorder.ops)
        finally:
            await delete_namespace(exchange, devices, amqp_url=broker_url)
    tally = judge(recorder.ops, recorder.deliveries, statuses)
    tally.outbox_left = outbox_left
    return tally


async def storm(
    producer_store: RabbitMQStore,
    device_store: RabbitMQStore,
    devices: list[str],
    recorder: MemoryRecorder,
    inject: Inject,
    rng: random.Random,
    seconds: float,
    *,
    once: bool,
) -> int:
    """Runs the storm and the recovery; returns how many ready commands stayed unpublished."""
    stop = asyncio.Event()
    producers = [
        asyncio.create_task(
            Producer(producer_store, device, random.Random(rng.random()), recorder, pause=0.01).run(
                stop
            )
        )
        for device in devices
    ]
    consumers = [
        asyncio.create_task(
            consume_forever(device_store, device, recorder, random.Random(rng.random()))
        )
        for device in devices
    ]
    try:
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            await inject()
            if once:
                break
        await asyncio.sleep(max(0.0, ends - time.monotonic()))
        stop.set()
        await asyncio.gather(*producers)

        async def outbox_empty() -> bool:
            return not await producer_store.state.unpublished(10_000)

        async def all_arrived() -> bool:
            return required_keys(recorder.ops) <= {d.key for d in recorder.deliveries}

        await _until(outbox_empty, 30)
        await _until(all_arrived, 30)
        await asyncio.sleep(0.5)  # late repeats, if any, are counted too
        return len(await producer_store.state.unpublished(10_000))
    finally:
        stop.set()
        for task in [*producers, *consumers]:
            task.cancel()
        await asyncio.gather(*producers, *consumers, return_exceptions=True)
