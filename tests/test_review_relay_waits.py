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

from amqp_queue import RabbitMQStore
from amqp_queue.relay_holds import PublishWaits
from amqp_queue.state.model import CommandRecord
from tests.support import matrix
from tests.tcp_proxy import StallProxy
from tests.test_adversarial_ninth import LONG, space_on, take

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

PUBLISH_TIMEOUT = 2.0
CALLS = 6


@pytest.mark.timeout(120)
async def timed_enqueues(
    store: RabbitMQStore, device: str, calls: int, link: StallProxy
) -> list[float]:
    """Enqueues b"0", b"1", ... one after another through the faulty ``link``; how long
    each call took. The link is restored after, whatever happened."""
    took: list[float] = []
    try:
        for n in range(calls):
            began = time.monotonic()
            await asyncio.wait_for(store.enqueue(device, b"%d" % n, LONG), 30)
            took.append(time.monotonic() - began)
    finally:
        link.resume()
        await link.restore()
    return took


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
        took = await timed_enqueues(store, device, CALLS, link)
        print("enqueue durations during the stall:", [f"{t:.2f}" for t in took])
        # Nothing lost, in order, once the link is back.
        want = {b"%d" % n for n in range(CALLS)}
        got = [p for _, p in await take(reader, device, want, 20)]
        assert got == [b"%d" % n for n in range(CALLS)], got
        # The first calls meet the stall; once the relay is known to be failing the rest
        # return its owed commands at once (the old behaviour).
        slow = [t for t in took[2:] if t > PUBLISH_TIMEOUT / 2]
        assert not slow, f"{len(slow)} of {CALLS - 2} later enqueues waited: {took}"


@pytest.mark.timeout(120)
async def test_a_call_waiting_when_the_relay_first_fails_on_the_broker_stops_waiting_soon(
    tmp_path: Path,
) -> None:
    """The race behind the first test's rare failure under load, made certain: the relay's
    outbox read is slow (a loaded machine), so its first failed try on the stalled link ends
    just after the third call began waiting (the second call's wait of publish_timeout ran
    out first). Decided when its wait began, that call waited publish_timeout too; the
    relay's broker failure cuts what a waiting call has left to BROKER_RETRY_WAIT."""
    async with StallProxy(5672, max_connections=16) as link, space_on("sqlite", tmp_path) as sp:
        url = f"{link.amqp_url}?reconnect_interval=0.2"
        store = await sp.open(url, publish_timeout=PUBLISH_TIMEOUT)
        reader = await sp.open()
        device = sp.device()
        await store.ensure_queue(device)
        read = store.state.unpublished

        async def slow_read(limit: int) -> list[CommandRecord]:
            await asyncio.sleep(0.2)  # longer than the third call's own write
            return await read(limit)

        store.state.unpublished = slow_read  # type: ignore[method-assign]
        link.stall()
        took = await timed_enqueues(store, device, 3, link)
        want = {b"%d" % n for n in range(3)}
        got = [p for _, p in await take(reader, device, want, 20)]
        assert got == [b"0", b"1", b"2"], got
        assert took[2] < PUBLISH_TIMEOUT / 2, f"the third enqueue waited: {took}"


async def test_a_broker_failure_cuts_the_waits_under_way_to_the_retry_wait() -> None:
    """The same, without a broker: a caller that began waiting during a pass (for up to
    publish_timeout) waits BROKER_RETRY_WAIT at most once that pass failed on the broker, and
    is not woken by the next try failing (a reconnect within that time publishes it)."""
    loop = asyncio.get_running_loop()
    waits = PublishWaits()
    number = waits.new_pass()
    waiting = asyncio.create_task(waits.wait("c1", 30.0))
    await asyncio.sleep(0.01)
    failed_at = loop.time()
    waits.failed(number, cut_to=0.2)
    waits.failed(waits.new_pass())  # the next try fails at once: it still waits
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await asyncio.wait_for(waiting, 5)
    assert 0.15 < loop.time() - failed_at < 2
