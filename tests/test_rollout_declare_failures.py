"""A rollout whose queue declarations fail logs them once, not once per device.

Found by a helper's probe: a 2,000-device rollout on a loaded broker whose declarations
timed out logged about 2,000 WARNING lines, one per device (a child process whose stderr
nobody read blocked on it). Its commands are still delivered, through the relay.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from amqp_queue.topology import Topology
from tests.rabbitmq_support import outbox_emptied, rabbitmq_store

DEVICES = [f"dev-{n}" for n in range(40)]


async def test_a_rollouts_failed_declarations_make_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    declare = Topology.ensure_queue
    failing = True

    async def times_out(topology: Topology, device_id: str) -> asyncio.Future[None]:
        if failing:
            raise TimeoutError
        return await declare(topology, device_id)

    async with rabbitmq_store(tmp_path) as store:
        monkeypatch.setattr(Topology, "ensure_queue", times_out)
        caplog.set_level(logging.WARNING, logger="amqp_queue")
        rollout = await store.enqueue_many(DEVICES, b"fw-2.1", 600)
        failing = False

        warnings = [r.getMessage() for r in caplog.records if "not declared" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert "40 of 40" in warnings[0]
        await outbox_emptied(store, 30)
        assert len(rollout.command_ids) == len(DEVICES)
        assert [await store.drain_pending(device) for device in DEVICES] == [[b"fw-2.1"]] * 40
