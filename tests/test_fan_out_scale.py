"""A fan-out to a fleet is one transaction on every index backend, whatever the fleet's size:
PostgreSQL takes a bounded number of advisory locks (its shared lock table holds a few
thousand), and a statement never holds more bind parameters than a database allows."""

from __future__ import annotations

from pathlib import Path

import pytest

from amqp_queue import CommandStatus, Limits, QueueFull
from amqp_queue.state.sql.statements import LOCK_BUCKETS, device_lock_keys
from tests.backends import INDEX_BACKENDS, indexed_store

FLEET = [f"dev-{n:05}" for n in range(12_000)]


@pytest.mark.parametrize("backend", INDEX_BACKENDS)
async def test_a_fan_out_to_twelve_thousand_devices_is_one_atomic_write(
    backend: str, tmp_path: Path
) -> None:
    async with indexed_store(backend, tmp_path, limits=Limits(max_pending_per_device=1)) as store:
        await store.enqueue(FLEET[-1], b"busy", 600)
        with pytest.raises(QueueFull):
            await store.enqueue_many(FLEET, b"fw", 600)
        assert await store.get_pending(FLEET[0]) == []

        rollout = await store.enqueue_many(FLEET[:-1], b"fw", 600)

        summary = await store.rollout_summary(rollout.rollout_id)
        assert summary.counts[CommandStatus.PENDING] == len(FLEET) - 1


def test_devices_share_a_bounded_set_of_lock_keys() -> None:
    keys = device_lock_keys(FLEET)

    assert len(keys) == LOCK_BUCKETS
    assert keys == sorted(keys)
    assert device_lock_keys(["dev-1"]) == device_lock_keys(["dev-1", "dev-1"])
