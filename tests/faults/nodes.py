"""Node loss on the local cluster, with quorum device queues.

A producer store and a device store, both connected through the cluster's address list (the
first node first, so the device queues they declare are led there), run flat out while a node
goes away and comes back:

- ``leader-kill``: SIGKILL to the Erlang VM of the node that leads the device queues, then the
  node is started again on its data and rejoins;
- ``follower-stop``: ``rabbitmqctl stop_app`` on a node that leads none of them (a follower of
  every device queue), then ``start_app``;
- ``leader-partition``: the node that leads the device queues (and that both stores are
  connected to) is cut off from the other two (``scripts/cluster.sh partition``), so under
  ``pause_minority`` it pauses and closes their connections, then the partition heals.

The stores must carry on through another node; judged as the other storms (nothing accepted
lost, nothing stale, statuses true, the outbox drained) plus order per hand-out stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time

from amqp_queue import QueueType, RabbitMQConfig
from tests.faults.cluster import Cluster, cluster_store
from tests.faults.crash import statuses_of
from tests.faults.ledger import ENQUEUES, Tally, judge, out_of_order
from tests.faults.storms import storm
from tests.faults.workload import MemoryRecorder
from tests.rabbitmq_support import delete_namespace
from tests.support import unique

FAULTS = ("leader-kill", "follower-stop", "leader-partition")
DEVICES = 3


def _config(exchange: str) -> RabbitMQConfig:
    # As the other trials (tests/faults/workload.py), on quorum queues.
    return RabbitMQConfig(
        exchange=exchange, queue_type=QueueType.QUORUM, publish_timeout=2.0, relay_interval=2.0
    )


async def node_loss_trial(
    cluster: Cluster,
    fault: str,
    rng: random.Random,
    spec: str,
    *,
    seconds: float = 6.0,
    down_for: tuple[float, float] = (1.0, 3.0),
) -> tuple[Tally, str]:
    """One storm with one node lost in the way ``fault`` says; the judged tally and a line on
    what happened (which node, how long until the stores were back)."""
    exchange = unique("faults.")
    devices = [f"gw-{n}" for n in range(DEVICES)]
    urls = [f"{url}?reconnect_interval=0.2&heartbeat=5" for url in cluster.urls]
    config = _config(exchange)
    recorder = MemoryRecorder()
    told: list[str] = []
    async with (
        cluster_store(spec, urls, config) as producer_store,
        cluster_store(spec, urls, config) as device_store,
    ):
        for device in devices:
            await producer_store.ensure_queue(device)
        queues = {config.queue_name(device) for device in devices}

        async def inject() -> None:
            leaders = await cluster.leaders(cluster.nodes[-1])
            led = {leaders[queue] for queue in queues}
            began = time.monotonic()
            if fault == "leader-kill":
                victim = sorted(led)[0]
                await cluster.kill(victim)
                await asyncio.sleep(rng.uniform(*down_for))
                await cluster.revive(victim)
            elif fault == "leader-partition":
                victim = sorted(led)[0]
                await cluster.partition(victim)
                try:
                    await asyncio.sleep(rng.uniform(*down_for))
                finally:
                    # Never left cut off: the next trials share the cluster.
                    await cluster.heal(victim)
            else:
                victim = next(node for node in reversed(cluster.nodes) if node not in led)
                await cluster.stop_app(victim)
                await asyncio.sleep(rng.uniform(*down_for))
                await cluster.start_app(victim)
            after = await cluster.leaders(victim)
            told.append(
                f"{fault} {victim} (led {'/'.join(sorted(led))}) at {began:.1f}, back in "
                f"{time.monotonic() - began:.1f}s, leaders after: "
                f"{'/'.join(sorted({after[queue] for queue in queues}))}"
            )

        try:
            outbox_left = await storm(
                producer_store,
                device_store,
                devices,
                recorder,
                inject,
                rng,
                seconds,
                once=True,
            )
            statuses = await statuses_of(producer_store, recorder.ops)
        finally:
            with contextlib.suppress(Exception):
                await delete_namespace(exchange, devices, amqp_url=cluster.urls[-1])
    tally = judge(recorder.ops, recorder.deliveries, statuses)
    tally.outbox_left = outbox_left
    tally.out_of_order = out_of_order(recorder.ops, recorder.deliveries)
    accepted = [
        op.returned
        for op in recorder.ops
        if op.kind in ENQUEUES and op.took_effect and op.returned is not None
    ]
    handed = [delivery.handed for delivery in recorder.deliveries]
    told.append(
        f"longest pause between accepted enqueues {_longest_gap(accepted):.1f}s, "
        f"between hand-outs to devices {_longest_gap(handed):.1f}s"
    )
    return tally, "; ".join(told)


def _longest_gap(moments: list[float]) -> float:
    """The longest time between two consecutive ``moments``: for accepted enqueues what the
    loss cost producers, for hand-outs what it cost devices."""
    ordered = sorted(moments)
    return max((b - a for a, b in itertools.pairwise(ordered)), default=0.0)
