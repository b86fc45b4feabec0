"""Commands a store leaves to its own outbox relay, seen from other stores on the same index.

Found by an adversarial helper (fifth round, restarts and several processes), each failing on
the old code:

- A fan-out to more than 1,000 devices is published by the relay (``FAN_OUT_IN_FLIGHT``), and
  ``enqueue_many`` returned before it was: a plain command another store enqueued afterwards
  to one of those devices was published first (12 of 12 runs, no fault at all).
- A short-lived store (a command-line ``enqueue`` or ``confirm``) beside a busy one holds its
  command back behind the busy store's publishes in flight at its start, owed to its relay;
  ``close()`` stopped the relay without publishing it, so it waited for the relay lease's
  sweep (half a minute) and a command with 6 s to live expired while its device was online.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import eventually
from tests.test_adversarial_seams import BACKENDS, Env, Handout, consume_until, env_on

pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]
LONG = 600.0


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    async with env_on(request.param, tmp_path, prefix="owed.") as shared:
        yield shared


async def test_a_large_fan_out_is_not_overtaken_by_a_later_enqueue_on_another_store(
    env: Env,
) -> None:
    devices = [env.device() for _ in range(1001)]
    target = devices[-1]
    a = await env.open(relay_interval=30.0)
    b = await env.open(relay_interval=30.0)
    rollout = await a.enqueue_many(devices, b"fan-out", LONG)
    later = await b.enqueue(target, b"later", LONG)
    out: list[Handout] = []
    await asyncio.wait_for(consume_until(b, target, out, done=lambda: len(out) >= 2, idle=5), 20)
    assert [h.payload for h in out] == [b"fan-out", b"later"]
    assert [h.id for h in out] == [rollout.command_ids[-1], later]


@pytest.mark.parametrize("call", ["enqueue", "confirm"])
async def test_a_command_line_call_beside_a_busy_store_reaches_an_online_device_before_its_ttl(
    env: Env, call: str
) -> None:
    """The device is online (a stream on store C) and C enqueues to it flat out. A
    short-lived store makes a command with 6 s to live ready and closes: the online device
    must get it, not see it expire."""
    device = env.device()
    c = await env.open(relay_after=None, relay_interval=30.0)
    waiting = await c.enqueue_with_confirmation(device, "cf", b"X", 6.0)
    stop = asyncio.Event()

    async def busy() -> None:
        i = 0
        while not stop.is_set():
            await c.enqueue(device, f"c:{i:06d}".encode(), LONG)
            i += 1

    out: list[Handout] = []
    producing = asyncio.create_task(busy())
    await asyncio.sleep(0.3)
    consumer = asyncio.create_task(consume_until(c, device, out, done=lambda: False, idle=3))
    s = await env.open(relay_after=None, relay_interval=30.0)
    if call == "enqueue":
        x = await s.enqueue(device, b"X", 6.0)
    else:
        await s.confirm_command(waiting)
        x = waiting
    returned = time.time()
    await s.close()

    async def handed_out() -> bool:
        return any(h.id == x for h in out)

    with contextlib.suppress(TimeoutError):
        await eventually(handed_out, 10)
    stop.set()
    await producing
    await asyncio.wait_for(consumer, 20)
    seen = [h.at.timestamp() - returned for h in out if h.id == x]
    assert seen, f"{call}: never handed out: {await c.get_status(x)}"
    assert seen[0] < 2.0, f"{call}: handed out {seen[0]:.1f} s after the call returned"
