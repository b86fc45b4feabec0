"""A bare store's drain cut by its caller after its hand-over landed.

The drain marked its commands ``DELIVERED``, then gave them back (open again) because its
caller never got them. In between, other calls took ``DELIVERED`` at its word: a latest-wins
replacement left the delivered command alone and its new command was drained, a retire or a
rollout's cancel skipped it; the give-back then reopened the old command and a later drain
handed it out, after the call that should have stopped it had returned (a helper's probe,
150 rounds each: replace PostgreSQL 39, Redis 8; retire SQLite 66, PostgreSQL 75, Redis 17;
rollout cancel SQLite 97, PostgreSQL 99, Redis 23). A device then ends on the older
setpoint. A drain whose hand-over landed now returns its commands, as ``RabbitMQStore``'s
does, and nothing is given back.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from amqp_queue import Store
from tests.backends import BACKENDS, INDEX_BACKENDS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

ROUNDS = 60


@pytest.mark.parametrize("kind", ["replace", "retire", "rollout"])
@pytest.mark.parametrize("backend", INDEX_BACKENDS)
async def test_a_cut_drain_never_reopens_what_a_later_call_relied_on(
    backend: str, kind: str, tmp_path: Path
) -> None:
    rng = random.Random(f"{backend}-{kind}")
    stale = []
    async with BACKENDS[backend](tmp_path) as store:
        assert isinstance(store, Store)
        for n in range(ROUNDS):
            device = f"gw-{n}"
            if kind == "rollout":
                rollout = await store.enqueue_many([device], b"old", 60, command_type="sp")
            else:
                await store.enqueue_or_update(device, "sp", b"old", 60)
            handed: list[tuple[float, bytes]] = []

            async def drain(
                cut: float | None = None,
                device: str = device,
                handed: list[tuple[float, bytes]] = handed,
            ) -> None:
                began = time.monotonic()
                try:
                    got = await asyncio.wait_for(store.drain_pending(device), cut)
                except TimeoutError:
                    return
                handed.extend((began, payload) for payload in got)

            cut_drain = asyncio.create_task(drain(rng.uniform(0, 0.01)))
            await asyncio.sleep(rng.uniform(0, 0.008))
            if kind == "replace":
                await store.enqueue_or_update(device, "sp", b"new", 60)
                returned = time.monotonic()
                await drain()  # the device takes the new setpoint
            elif kind == "retire":
                await store.retire_device(device)
                returned = time.monotonic()
            else:
                await store.cancel_rollout(rollout.rollout_id)
                returned = time.monotonic()
            await cut_drain
            await drain()
            stale += [device for began, payload in handed if payload == b"old" and began > returned]
    assert not stale, f"handed out after the {kind} returned: {stale}"
