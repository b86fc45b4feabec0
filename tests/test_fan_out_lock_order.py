"""Latest-wins fan-outs that name the same devices in different orders, at once.

Found by an adversarial run: on PostgreSQL each fan-out ended the open command of each
device's slot and inserted its own in the order its caller listed the devices, so two of
them locked the same rows in opposite orders and deadlocked; after the deadlock retries 3
to 5 of 8 calls failed with StateError "deadlock detected", up to 27 s later. Every call
is valid (rule 3: the latest wins) and must be accepted.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.backends import BACKENDS, INDEX_BACKENDS

DEVICES = [f"dev{i}" for i in range(6)]


@pytest.mark.parametrize("backend", INDEX_BACKENDS)
async def test_typed_fan_outs_listing_devices_in_other_orders_are_all_accepted(
    backend: str, tmp_path: Path
) -> None:
    rnd = random.Random(3)
    async with BACKENDS[backend](tmp_path) as store:

        async def fan_out(n: int) -> BaseException | None:
            devices = rnd.sample(DEVICES, len(DEVICES))
            try:
                await store.enqueue_many(devices, b"v%d" % n, 600, command_type="firmware")
            except Exception as exc:  # counted below, with the others
                return exc
            return None

        outcomes = await asyncio.wait_for(asyncio.gather(*(fan_out(n) for n in range(8))), 60)

        assert [repr(outcome)[:160] for outcome in outcomes if outcome is not None] == []
        for device in DEVICES:
            assert len(await store.get_pending(device)) == 1
