"""A fleet of streams through one store: their delivery marks share commits.

Each stream marked its finished commands in a write of its own, and with hundreds of streams
ending together those writes queued on the index behind each other: a stream's close waits
for its marks for ``publish_timeout`` at most, and the ones still queued then left their
commands unacked (requeued, handed out again) and not ``DELIVERED``."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from pathlib import Path

import pytest

from amqp_queue import CommandStatus, RabbitMQStore
from tests.support import matrix
from tests.test_adversarial_ninth import LONG, space_on

ALL = ["sqlite", "postgres", "redis"]
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


async def _take(store: RabbitMQStore, device: str, count: int) -> list[str]:
    got: list[str] = []
    async with store.consume(device) as commands:
        async for command in commands:
            got.append(command.id)
            if len(got) == count:
                break
    return got


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", matrix(ALL, ["sqlite"]))
async def test_streams_ending_together_share_their_delivery_mark_commits(
    backend: str, tmp_path: Path
) -> None:
    """200 devices with 3 commands each, every stream at once through one store: far fewer
    index writes than streams carry the marks (each stream wrote at least one of its own,
    one after another on SQLite's one writer), and every command ends DELIVERED."""
    async with space_on(backend, tmp_path) as space:
        devices = [space.device() for _ in range(200)]
        store = await space.open()
        ids = [await store.enqueue(device, b"c", LONG) for _ in range(3) for device in devices]
        writes = 0
        mark_delivered = store.state.mark_delivered

        async def counted(command_ids: Collection[str]) -> int:
            nonlocal writes
            writes += 1
            return await mark_delivered(command_ids)

        store.state.mark_delivered = counted  # type: ignore[method-assign]
        taken = await asyncio.gather(*(_take(store, device, 3) for device in devices))
        assert sorted(i for got in taken for i in got) == sorted(ids)
        statuses = await asyncio.gather(*(store.get_status(i) for i in ids))
        late = [i for i, s in zip(ids, statuses, strict=True) if s != CommandStatus.DELIVERED]
        assert not late, f"{len(late)} of {len(ids)} handed-out commands not DELIVERED"
        assert writes < len(devices) // 2, f"{writes} mark writes for {len(devices)} streams"
