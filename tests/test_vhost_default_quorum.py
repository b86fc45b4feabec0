"""A store configured for classic queues on a vhost whose default queue type is quorum.

RabbitMQ 3.x gives every queue declared there without ``x-queue-type`` the vhost's default,
so the store's "classic" device queues are quorum. Since the twenty-sixth session a consumer
on a classic queue passes ``x-cancel-on-ha-failover`` (see amqp_queue/inbox.py), which a
quorum queue refuses: a review found that every stream and drain would then fail with the
broker's bare PRECONDITION_FAILED. They fail with a :class:`QueueMismatch` saying what to set,
nothing is lost, and a store set to quorum hands the command out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from amqp_queue import QueueMismatch, QueueType, RabbitMQConfig, RabbitMQStore
from tests.support import unique


async def _rabbitmqctl(*args: str) -> None:
    ctl = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await ctl.communicate()
    assert ctl.returncode == 0, err.decode()


@asynccontextmanager
async def _vhost_of_quorum_queues() -> AsyncIterator[str]:
    """A vhost of its own whose default queue type is quorum; its URL."""
    vhost = unique("qvh-")
    await _rabbitmqctl("add_vhost", vhost, "--default-queue-type", "quorum")
    try:
        await _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        await _rabbitmqctl("delete_vhost", vhost)


@pytest.mark.timeout(60)
async def test_a_classic_store_on_a_quorum_vhost_says_what_to_set(tmp_path: Path) -> None:
    state = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    async with _vhost_of_quorum_queues() as url:
        classic = RabbitMQConfig(exchange="ble.commands")
        async with await RabbitMQStore.connect(url, state_url=state, config=classic) as store:
            await store.enqueue("dev-1", b"x", 60)
            with pytest.raises(QueueMismatch, match="set queue_type to quorum"):
                await store.drain_pending("dev-1")

        quorum = RabbitMQConfig(exchange="ble.commands", queue_type=QueueType.QUORUM)
        async with await RabbitMQStore.connect(url, state_url=state, config=quorum) as store:
            assert await store.drain_pending("dev-1") == [b"x"]
