"""Owed commands republished after their queue was deleted behind the publisher's cache keep
their order (found by the full adversarial matrix, eighteenth session; reproduced by a helper):
a later unroutable return forgot the re-declaration an earlier command waited on, and the later
command's own declaration let it overtake."""

from __future__ import annotations

import asyncio
from contextlib import suppress
from pathlib import Path

import pytest

from tests.test_adversarial_ninth import space_on, take


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["sqlite", "postgres", "redis"])
async def test_owed_commands_after_a_retire_keep_their_order(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with space_on(backend, tmp_path) as space:
        device = space.device()
        p = await space.open(publish_timeout=1.0)
        o, d = await space.open(), await space.open()
        await p.ensure_queue(device)  # p caches the queue as declared
        await o.retire_device(device)  # deleted behind p's cache (nothing open to cancel)

        # p's relay is behind (a pass slow under load): enqueue waits publish_timeout for it
        # (OutboxRelay.published) and returns with its command still owed.
        relay = p._relay
        assert relay is not None
        gate, flushed, real_flush = asyncio.Event(), asyncio.Event(), relay.flush
        entered = asyncio.Event()

        async def held_flush() -> int:
            entered.set()
            await gate.wait()
            published = await real_flush()
            if not relay.owes:
                flushed.set()
            return published

        monkeypatch.setattr(relay, "flush", held_flush)
        relay.kick()
        # A pass is under way and held, with the kick pending: the enqueues go to the relay
        # (a pass that ended just before would let them publish directly, in order).
        await asyncio.wait_for(entered.wait(), 10)
        first = await p.enqueue(device, b"1", 600)
        second = await p.enqueue(device, b"2", 600)  # began after the first returned

        # The first re-declaration after the unroutable returns ends only once a second one
        # (the old code's) has: at most a second later, where there is no second one.
        topology = await p._ready()
        real_declare, calls, second_done = topology._declare, list[str](), asyncio.Event()

        async def declare(device_id: str) -> None:
            calls.append(device_id)
            if len(calls) == 1:
                with suppress(TimeoutError):
                    await asyncio.wait_for(second_done.wait(), 1.0)
            await real_declare(device_id)
            if len(calls) > 1:
                second_done.set()

        monkeypatch.setattr(topology, "_declare", declare)
        gate.set()
        relay.kick()
        await asyncio.wait_for(flushed.wait(), 15)
        assert calls, "no publish came back unroutable: the queue was not gone"
        got = await take(d, device, {b"1", b"2"}, 10)  # a stream hands out in queue order
        assert got == [(first, b"1"), (second, b"2")], (got, calls)
