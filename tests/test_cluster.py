"""A three-node RabbitMQ cluster (scripts/cluster.sh): quorum device queues, and a store that
carries on when the node it is connected to goes away.

The module starts a cluster of its own (about 20 s) and removes it afterwards: private nodes
named after a unique prefix, on free ports, so it neither meets ``make cluster``'s c1..c3 nor
another checkout's run. The machine's broker is not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from amqp_queue import QueueType, RabbitMQConfig, RabbitMQStore
from amqp_queue.connection import FailoverConnection
from amqp_queue.errors import BROKER_FAILURES, BrokerError
from tests.backends import POSTGRES_URL, postgres_schema
from tests.faults.cluster import Cluster
from tests.faults.nodes import node_loss_trial
from tests.private_broker import AMQP_PORTS, DIST_OFFSET, _port_free
from tests.support import eventually, unique

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cluster.sh"
PREFIX = unique("cl")
NODES = tuple(f"{PREFIX}{i}" for i in (1, 2, 3))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _free_base_port() -> int:
    """The first of three consecutive free AMQP ports whose distribution twins are free."""
    for base in random.sample(AMQP_PORTS[:-3], 200):
        ports = [base + i for i in range(3)]
        if all(_port_free(port) and _port_free(port + DIST_OFFSET) for port in ports):
            return base
    raise RuntimeError(f"no three free consecutive ports in {AMQP_PORTS}")


ENV = {
    **os.environ,
    "CLUSTER_PREFIX": PREFIX,
    "CLUSTER_BASE_PORT": str(_free_base_port()),
    # Not pytest's tmp_path: the rabbitmq user that runs the nodes (as root) must reach it.
    "AMQP_QUEUE_CLUSTER_DIR": str(Path(tempfile.gettempdir()) / f"amqp-queue-{PREFIX}"),
}


def _cluster(*args: str, timeout: float = 180.0) -> str:
    done = subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=ENV,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"cluster.sh {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


@pytest.fixture(scope="module")
def cluster_urls() -> Iterator[list[str]]:
    """The cluster's node URLs, the first node's first; the cluster is removed afterwards.

    Not started early in the background: idle, three nodes' schedulers spin for CPU the
    rest of the suite needs on two cores (the run took minutes longer)."""
    try:
        output = _cluster("start")
        urls = output.strip().splitlines()[-1].split(",")
        assert len(urls) == len(NODES)
        yield urls
    finally:
        _cluster("stop")


def _node_of(url: str, urls: list[str]) -> str:
    return NODES[urls.index(url)]


def _queue_column(node: str, column: str) -> dict[str, str]:
    """``rabbitmqctl list_queues name COLUMN`` as ``node`` sees it: queue name -> value."""
    output = _cluster("ctl", node, "-q", "--no-table-headers", "list_queues", "name", column)
    values = {}
    for line in output.splitlines():
        name, _, value = line.rpartition("\t")
        values[name] = value
    return values


def _queue_types(node: str) -> dict[str, str]:
    return _queue_column(node, "type")


def _app_running(node: str) -> bool:
    return _cluster("ctl", node, "-q", "eval", "rabbit:is_running().").strip() == "true"


@asynccontextmanager
async def cluster_store(
    urls: list[str], tmp_path: Path, *, state_url: str | None = None, **config: Any
) -> AsyncIterator[RabbitMQStore]:
    """A store on the whole cluster (its URLs, c1 first) with quorum device queues in a
    namespace of its own, deleted afterwards through whichever node answers."""
    exchange = unique("cluster.")
    store = await RabbitMQStore.connect(
        ",".join(urls),
        state_url=state_url or f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        config=RabbitMQConfig(exchange=exchange, queue_type=QueueType.QUORUM, **config),
        connect_timeout=30.0,
    )
    try:
        async with store:
            yield store
    finally:
        devices = store.declared_devices
        with contextlib.suppress(*BROKER_FAILURES, BrokerError):
            connection = await aio_pika.connect(",".join(urls).split(",")[-1])
            async with connection:
                channel = await connection.channel()
                for device in devices:
                    await channel.queue_delete(store.config.queue_name(device))
                await channel.exchange_delete(exchange)


async def _ready_counts(url: str, store: RabbitMQStore, devices: list[str]) -> list[int]:
    """Ready messages in each device queue, by passive declares over a connection of its own
    (a robust channel answers from its cache)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        counts = []
        for device in devices:
            queue = await channel.declare_queue(store.config.queue_name(device), passive=True)
            counts.append(queue.declaration_result.message_count or 0)
        return counts


def connected_url(store: RabbitMQStore) -> str:
    """The node URL the store's connection is on now."""
    connection = store._connection  # the store's own: which node it is on, for the test
    assert isinstance(connection, FailoverConnection)
    return str(connection.url.with_query(None))


async def test_device_queues_are_quorum_queues_and_keep_order_and_ttl(
    cluster_urls: list[str], tmp_path: Path
) -> None:
    async with cluster_store(cluster_urls, tmp_path) as store:
        payloads = [f"command {i}".encode() for i in range(20)]
        for payload in payloads:
            await store.enqueue("gw-1", payload, 600)

        queue = store.config.queue_name("gw-1")
        types = await asyncio.to_thread(_queue_types, NODES[1])  # any member sees every queue
        assert types.get(queue) == "quorum", types

        assert await store.drain_pending("gw-1") == payloads

        # consume hands them out in order too
        for payload in payloads[:3]:
            await store.enqueue("gw-2", payload, 600)
        got: list[bytes] = []
        async with asyncio.timeout(20), store.consume("gw-2") as stream:
            async for command in stream:
                got.append(command.payload)
                if len(got) == 3:
                    break
        assert got == payloads[:3]

        # per-message TTL: the quorum queue drops a command whose ttl has passed from its
        # head (broker time: waited for, not simulated), and it is never handed out
        await store.enqueue("gw-3", b"stale soon", 1)
        await store.enqueue("gw-3", b"lives", 600)
        await store.enqueue("gw-4", b"stale", 1)

        async def stale_heads_dropped() -> bool:
            depths = await _ready_counts(cluster_urls[0], store, ["gw-3", "gw-4"])
            return depths == [1, 0]

        await eventually(stale_heads_dropped, 30)
        assert await store.drain_pending("gw-3") == [b"lives"]
        assert await store.drain_pending("gw-4") == []
        assert _queue_types(NODES[2]).get(store.config.queue_name("gw-4")) == "quorum"


async def test_losing_the_connected_node_loses_nothing(
    cluster_urls: list[str], tmp_path: Path
) -> None:
    # Short reconnect pauses and publish timeout: the store moves on to the next node soon.
    urls = [f"{cluster_urls[0]}?reconnect_interval=0.5&heartbeat=5", *cluster_urls[1:]]
    async with cluster_store(urls, tmp_path, publish_timeout=3.0, relay_interval=1.0) as store:
        before = [f"before {i}".encode() for i in range(10)]
        for payload in before:
            await store.enqueue("gw-1", payload, 600)
        await store.ensure_queue("gw-2")
        await store.enqueue("gw-2", b"first for the consumer", 600)

        lost = _node_of(connected_url(store), cluster_urls)
        survivors = [url for url in cluster_urls if _node_of(url, cluster_urls) != lost]
        witness = _node_of(survivors[0], cluster_urls)
        queue = store.config.queue_name("gw-1")
        # Declared over a connection to that node, the queue's leader is there (client-local).
        leader = (await asyncio.to_thread(_queue_column, witness, "leader"))[queue]
        loop = asyncio.get_running_loop()
        stopped_at = loop.time()  # stop_app returns once the app is down: a second or two
        await asyncio.to_thread(_cluster, "ctl", lost, "-q", "stop_app")
        try:
            stop_took = loop.time() - stopped_at
            assert not await asyncio.to_thread(_app_running, lost)

            async def elsewhere() -> bool:
                connection = store._connection
                return connected_url(store) in survivors and connection.connected.is_set()

            await eventually(elsewhere, 60)
            reconnected = loop.time() - stopped_at

            # Enqueues carry on through another node (any publish the broker did not confirm
            # is left to the relay, which sends it once the store is connected again).
            after = [f"after {i}".encode() for i in range(10)]
            async with asyncio.timeout(60):
                for payload in after:
                    await store.enqueue("gw-1", payload, 600)

            got: list[bytes] = []

            async def all_delivered() -> bool:
                with contextlib.suppress(BrokerError, *BROKER_FAILURES):
                    got.extend(await store.drain_pending("gw-1"))
                return len(got) >= len(before) + len(after)

            await eventually(all_delivered, 60)
            delivered = loop.time() - stopped_at
            await asyncio.sleep(0.5)
            got.extend(await store.drain_pending("gw-1"))
            assert sorted(got) == sorted(before + after), "lost or duplicated commands"
            assert got[: len(before)] == before
            new_leader = (await asyncio.to_thread(_queue_column, witness, "leader"))[queue]
            assert not new_leader.startswith(f"{lost}@")

            # A consumer opened after the loss gets what was queued before it and after it.
            await store.enqueue("gw-2", b"second for the consumer", 600)
            consumed: list[bytes] = []
            async with asyncio.timeout(60):
                while len(consumed) < 2:
                    with contextlib.suppress(BrokerError, *BROKER_FAILURES):
                        async with store.consume("gw-2") as stream:
                            async for command in stream:
                                consumed.append(command.payload)
                                if len(consumed) == 2:
                                    break
                    await asyncio.sleep(0.2)
            assert consumed == [b"first for the consumer", b"second for the consumer"]
            print(
                f"stopped {lost} (stop_app {stop_took:.1f}s): on another node after "
                f"{reconnected:.1f}s, "
                f"all {len(got)} commands drained {delivered:.1f}s after the loss; "
                f"queue leader {leader} -> {new_leader}"
            )
        finally:
            await asyncio.to_thread(_cluster, "ctl", lost, "-q", "start_app")
            await asyncio.to_thread(_cluster, "ctl", lost, "-q", "await_startup")


async def test_two_processes_on_one_postgres_index_deliver_each_command_once(
    cluster_urls: list[str],
) -> None:
    """A store process that enqueues and one that consumes, each with its own relay running,
    on one PostgreSQL index and the cluster: every command is handed out once."""
    count = 50
    exchange = unique("cluster.")
    device = "gw-shared"
    amqp_urls = ",".join(cluster_urls)
    async with postgres_schema() as schema:
        state_url = f"{POSTGRES_URL}?schema={schema}"
        child = [sys.executable, "-m", "tests.cluster_child"]
        consumer = await asyncio.create_subprocess_exec(
            *child, "consume", amqp_urls, state_url, exchange, device, str(count), "45",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert consumer.stdout is not None
            async with asyncio.timeout(60):
                assert (await consumer.stdout.readline()).strip() == b"ready"
            producer = await asyncio.create_subprocess_exec(
                *child, "enqueue", amqp_urls, state_url, exchange, device, str(count),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            async with asyncio.timeout(90):
                produced, _ = await producer.communicate()
                consumed, _ = await consumer.communicate()
            assert producer.returncode == 0
            assert consumer.returncode == 0
        finally:
            if consumer.returncode is None:
                consumer.kill()
                await consumer.wait()
        enqueued = json.loads(produced.decode().strip().splitlines()[-1])
        handed = json.loads(consumed.decode().strip().splitlines()[-1])
        assert len(enqueued) == count
        assert sorted(handed) == sorted(enqueued), "a command lost or handed out twice"
        assert handed == enqueued  # and in the order they were enqueued
    with contextlib.suppress(*BROKER_FAILURES):
        connection = await aio_pika.connect(cluster_urls[-1])
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(RabbitMQConfig(exchange=exchange).queue_name(device))
            await channel.exchange_delete(exchange)


async def test_killing_the_node_that_leads_the_device_queues_mid_storm_loses_nothing(
    cluster_urls: list[str], tmp_path: Path
) -> None:
    """The short form of the node-loss trial (``make reliability`` runs more): producers and
    devices on the address list while the leading node's VM is killed and started again."""
    cluster = Cluster(PREFIX, ENV, cluster_urls)
    spec = f"sqlite:{tmp_path / 'state.db'}"
    tally, told = await node_loss_trial(
        cluster, "leader-kill", random.Random("leader-kill"), spec, seconds=4.0
    )

    print(f"{told}; out of order: {tally.out_of_order}, repeats: {tally.duplicates}")
    assert tally.accepted > 0
    assert tally.delivered > 0
    assert (tally.lost, tally.stale, tally.wrong_status, tally.outbox_left) == (0, 0, 0, 0)
    # Not asserted here: order per device. The publish-side cause (the broker nacks a publish
    # and confirms a later one to the same quorum queue) is fixed; a consumer-side one may be
    # left (docs/scaling.md), so the long form, python -m tests.faults, counts order.


async def test_partitioning_the_node_that_leads_the_device_queues_mid_storm_loses_nothing(
    cluster_urls: list[str], tmp_path: Path
) -> None:
    """The short form of the partition trial: the leading node, which both stores are
    connected to, is cut off from the other two and pauses (pause_minority); the stores go on
    through the majority, and the node rejoins when the partition heals."""
    cluster = Cluster(PREFIX, ENV, cluster_urls)
    spec = f"sqlite:{tmp_path / 'state.db'}"
    tally, told = await node_loss_trial(
        cluster, "leader-partition", random.Random("leader-partition"), spec, seconds=4.0
    )

    print(f"{told}; out of order: {tally.out_of_order}, repeats: {tally.duplicates}")
    assert tally.accepted > 0
    assert tally.delivered > 0
    assert (tally.lost, tally.stale, tally.wrong_status, tally.outbox_left) == (0, 0, 0, 0)
    # The paused node's leaderships went to the majority side.
    victim = told.split()[1]
    leaders_after = told.split("leaders after: ")[1].split(";")[0].split("/")
    assert victim not in leaders_after, told
