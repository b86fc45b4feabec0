"""A local three-node RabbitMQ cluster for trials (scripts/cluster.sh), and stores on it.

:func:`local_cluster` starts one of its own (nodes named after a unique prefix, on free ports,
under a temp dir: it meets neither ``make cluster``'s c1..c3 nor another run's) and removes it
afterwards; :class:`Cluster` wraps the script's commands for a cluster that runs already.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from amqp_queue import RabbitMQConfig, RabbitMQStore
from amqp_queue.connection import connect_robust
from tests.faults.states import open_state_spec
from tests.private_broker import AMQP_PORTS, DIST_OFFSET, _port_free
from tests.support import unique

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cluster.sh"


class ClusterError(RuntimeError):
    """scripts/cluster.sh failed; the message carries its output."""


def free_base_port() -> int:
    """The first of three consecutive free AMQP ports whose distribution twins are free."""
    for base in random.sample(AMQP_PORTS[:-3], 200):
        ports = [base + i for i in range(3)]
        if all(_port_free(port) and _port_free(port + DIST_OFFSET) for port in ports):
            return base
    raise ClusterError(f"no three free consecutive ports in {AMQP_PORTS}")


def cluster_env(prefix: str) -> dict[str, str]:
    """The environment for scripts/cluster.sh to run the cluster of nodes ``prefix``1..3."""
    return {
        **os.environ,
        "CLUSTER_PREFIX": prefix,
        "CLUSTER_BASE_PORT": str(free_base_port()),
        # The rabbitmq user that runs the nodes (as root) must reach the directory.
        "AMQP_QUEUE_CLUSTER_DIR": str(Path(tempfile.gettempdir()) / f"amqp-queue-{prefix}"),
    }


@dataclass
class Cluster:
    """Nodes ``prefix``1..3 run by scripts/cluster.sh with ``env``; ``urls`` in node order."""

    prefix: str
    env: dict[str, str]
    urls: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in (1, 2, 3)]

    def script(self, *args: str, timeout: float = 180.0) -> str:
        done = subprocess.run(
            [str(SCRIPT), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env,
        )
        if done.returncode != 0:
            raise ClusterError(
                f"cluster.sh {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done.stdout

    async def run(self, *args: str) -> str:
        return await asyncio.to_thread(self.script, *args)

    async def leaders(self, asked: str) -> dict[str, str]:
        """Queue name -> the node (``prefix``N, without ``@localhost``) leading it, as node
        ``asked`` sees it."""
        listing = await self.run(
            "ctl", asked, "-q", "--no-table-headers", "list_queues", "name", "leader"
        )
        leaders = {}
        for line in listing.splitlines():
            name, _, leader = line.rpartition("\t")
            leaders[name] = leader.partition("@")[0]
        return leaders

    async def kill(self, node: str) -> None:
        """SIGKILL to the node's VM."""
        await self.run("kill", node)

    async def revive(self, node: str) -> None:
        """Starts a killed node again on its data; returns once its app runs."""
        await self.run("revive", node)

    async def partition(self, node: str) -> None:
        """Cuts the node off from the other two (its clients still reach it)."""
        await self.run("partition", node)

    async def heal(self, node: str) -> None:
        """Ends the partition; returns once the node runs again as one of three."""
        await self.run("heal", node)

    async def stop_app(self, node: str) -> None:
        await self.run("ctl", node, "-q", "stop_app")

    async def start_app(self, node: str) -> None:
        await self.run("ctl", node, "-q", "start_app")
        await self.run("ctl", node, "-q", "await_startup")


@asynccontextmanager
async def local_cluster() -> AsyncIterator[Cluster]:
    """A fresh cluster of three private nodes (about 20-35 s to start); removed after."""
    cluster = Cluster(unique("cl"), {})
    cluster.env = cluster_env(cluster.prefix)
    try:
        output = await cluster.run("start")
        cluster.urls = output.strip().splitlines()[-1].split(",")
        yield cluster
    finally:
        await cluster.run("stop")


@asynccontextmanager
async def cluster_store(
    spec: str, urls: list[str], config: RabbitMQConfig
) -> AsyncIterator[RabbitMQStore]:
    """A started RabbitMQStore on the state ``spec`` names, connected through the cluster's
    address list (the library's failover connection), closed afterwards."""
    state = await open_state_spec(spec)
    try:
        connection = await connect_robust(",".join(urls), 30.0)
        try:
            async with RabbitMQStore(connection, config, state=state) as store:
                yield store
        finally:
            await connection.close()
    finally:
        await state.close()
