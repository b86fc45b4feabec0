"""Review of the removal of OutboxRelay.failing (02f6d7f): a call whose command goes through
the relay always waits for the relay's next try. With the broker link stalled (a dead link,
or a broker blocking publishers under a resource alarm), every try lasts publish_timeout, so
EVERY enqueue now waits about publish_timeout before it returns its (owed) command; before,
once a pass had failed, the calls returned at once and the relay published them in order
when the broker came back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.support import matrix
from tests.tcp_proxy import StallProxy
from tests.test_adversarial_ninth import LONG, space_on, take

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

PUBLISH_TIMEOUT = 2.0
CALLS = 6


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("backend", "fault"),
    matrix(
        [
            ("sqlite", "stall"),
            ("postgres", "stall"),
            ("sqlite", "cut"),  # a refused link fails each try at once: calls stay fast
        ],
        [("postgres", "stall")],
    ),
)
async def test_enqueues_during_a_broker_stall_do_not_each_wait_publish_timeout(
    backend: str, fault: str, tmp_path: Path
) -> None:
    """``stall``: every byte held; ``cut``: the link dropped and reconnects refused (the
    broker down or restarting)."""
    async with StallProxy(5672, max_connections=16) as link, space_on(backend, tmp_path) as sp:
        url = f"{link.amqp_url}?reconnect_interval=0.2"
        store = await sp.open(url, publish_timeout=PUBLISH_TIMEOUT)
        reader = await sp.open()
        device = sp.device()
        await store.ensure_queue(device)
        if fault == "stall":
            link.stall()
        else:
            await link.cut()
        took: list[float] = []
        try:
            for n in range(CALLS):
                began = time.monotonic()
                await asyncio.wait_for(store.enqueue(device, b"%d" % n, LONG), 30)
                took.append(time.monotonic() - began)
        finally:
            link.resume()
            await link.restore()
        print("enqueue durations during the stall:", [f"{t:.2f}" for t in took])
        # Nothing lost, in order, once the link is back.
        want = {b"%d" % n for n in range(CALLS)}
        got = [p for _, p in await take(reader, device, want, 20)]
        assert got == [b"%d" % n for n in range(CALLS)], got
        # The first calls meet the stall; once the relay is known to be failing the rest
        # return its owed commands at once (the old behaviour).
        slow = [t for t in took[2:] if t > PUBLISH_TIMEOUT / 2]
        assert not slow, f"{len(slow)} of {CALLS - 2} later enqueues waited: {took}"
