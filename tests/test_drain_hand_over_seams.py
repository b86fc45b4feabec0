"""A drain between its claim and its hand-over, where it meets a closing store, a failing
index or another process's reader (the combinations the seventeenth session's re-read listed
as untested). Whatever the order of events: every command reaches a device exactly once, in
the end delivered, none left claimed or open for nobody."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import CommandStatus, StateError
from amqp_queue.state import rules
from amqp_queue.state.model import CommandRecord
from tests import drain_dies_child
from tests.rabbitmq_support import AMQP_URL
from tests.test_adversarial_seams import (
    Env,
    env_on,
)

BACKENDS = ["sqlite", "postgres", "redis"]


async def _all_delivered_once(
    env: Env, device: str, ids: Sequence[str], first: list[bytes]
) -> None:
    """What ``first`` (a drain cut short) returned and what a fresh store drains from here on
    are every command, each once, within seconds; and the index says each was delivered."""
    reader = await env.open()
    payloads = [b"%d" % n for n in range(len(ids))]
    later: list[bytes] = []
    # Seconds: a refused give-back's relay tries again within one (not at its next pass).
    async with asyncio.timeout(10):
        while len(first) + len(later) < len(payloads):
            later += await reader.drain_pending(device)
            await asyncio.sleep(0.1)
    later += await reader.drain_pending(device)  # a copy, were anything given back twice
    assert sorted(first + later) == payloads, f"first {first}, later {later}"
    assert [await reader.get_status(i) for i in ids] == [CommandStatus.DELIVERED] * len(ids)


@pytest.mark.parametrize("phase", ["claim", "hand_over"])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_close_while_a_drain_is_between_its_phases(
    backend: str, phase: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close()`` while the drain's claim (or its hand-over) has committed and not answered
    yet: the drain either returns the commands or gives them back, never neither or both."""
    async with env_on(backend, tmp_path, prefix="handover.") as env:
        producer, drainer = await env.open(), await env.open()
        device = env.device()
        ids = [await producer.enqueue(device, b"%d" % n, 600) for n in range(4)]
        real = getattr(drainer.state, phase)
        landed, release = asyncio.Event(), asyncio.Event()

        async def held(*args: Any) -> Any:
            answer = await real(*args)
            landed.set()
            await release.wait()
            return answer

        monkeypatch.setattr(drainer.state, phase, held)
        drain = asyncio.create_task(drainer.drain_pending(device))
        async with asyncio.timeout(10):
            await landed.wait()
        end, ending = drainer._running.end, asyncio.Event()

        async def ends(drain_grace: float) -> None:
            ending.set()
            await end(drain_grace)

        monkeypatch.setattr(drainer._running, "end", ends)
        closing = asyncio.create_task(drainer.close())
        async with asyncio.timeout(10):
            await ending.wait()  # close() is under way: it ends the running drains
        release.set()
        first: list[bytes] = []
        async with asyncio.timeout(30):
            with suppress(Exception):  # a drain ended by close() may raise; it returned none
                first = await drain
            await closing

        await _all_delivered_once(env, device, ids, first)


@pytest.mark.parametrize("landed", [False, True], ids=["not-landed", "landed"])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_failed_hand_over_whose_give_back_fails_too(
    backend: str, landed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index fails the hand-over (before its write, or after it committed: an answer
    lost) and then the give-back's release for a while. The drain raises; its store's relay
    gives back once the index answers, and the commands reach a device once each."""
    async with env_on(backend, tmp_path, prefix="handover.") as env:
        # Its give-back tries the release for publish_timeout before it owes it to the relay,
        # whose regular passes come at the default interval (the suite's stores: 1 s).
        producer = await env.open()
        drainer = await env.open(publish_timeout=1.0, relay_interval=30.0)
        device = env.device()
        ids = [await producer.enqueue(device, b"%d" % n, 600) for n in range(4)]
        hand_over, release = drainer.state.hand_over, drainer.state.release
        index_back, drain_ended, relay_refused = asyncio.Event(), False, asyncio.Event()

        async def failing_hand_over(claimed: Sequence[CommandRecord]) -> Any:
            if landed:
                await hand_over(claimed)
            raise StateError("state index write failed: injected")

        async def failing_release(*args: Any) -> Any:
            if not index_back.is_set():
                if drain_ended:
                    relay_refused.set()  # the relay's try, once the drain owed it the release
                raise StateError("state index write failed: injected")
            return await release(*args)

        monkeypatch.setattr(drainer.state, "hand_over", failing_hand_over)
        monkeypatch.setattr(drainer.state, "release", failing_release)
        with pytest.raises(StateError):
            await drainer.drain_pending(device)
        drain_ended = True
        # The index comes back only after the relay was refused once: when it tries again
        # decides how long the commands stay delivered to nobody.
        async with asyncio.timeout(10):
            await relay_refused.wait()
        index_back.set()

        await _all_delivered_once(env, device, ids, [])


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_stream_open_when_another_process_dies_at_its_hand_over(
    backend: str, tmp_path: Path
) -> None:
    """A device's stream is already waiting on its queue when another process's drain,
    holding the device's messages under its claim, dies before its hand-over: the stream gets
    the redelivered messages, ends the dead claims and hands every command out, in order,
    long before the claims would lapse."""
    async with env_on(backend, tmp_path, prefix="handover.") as env:
        producer = await env.open()
        device = env.device()
        payloads = [b"%d" % n for n in range(5)]
        for payload in payloads:
            await producer.enqueue(device, payload, 600)
        child = await drain_dies_child.spawn(
            AMQP_URL, env.state_url, env.exchange, device, hold=True
        )
        assert child.stdin is not None
        assert child.stdout is not None
        got: list[bytes] = []
        try:
            line = await asyncio.wait_for(child.stdout.readline(), 30)
            assert line.decode().split() == ["claimed", "5"]
            # Open while the child holds every message unacked: it waits for the redelivery.
            async with producer.consume(device) as stream:
                child.stdin.write(b"die\n")  # the child dies once this stream waits
                await child.stdin.drain()
                started = time.monotonic()
                async with asyncio.timeout(rules.CLAIM_LEASE.total_seconds() / 2):
                    async for command in stream:
                        got.append(command.payload)
                        if len(got) == len(payloads):
                            break
            await asyncio.wait_for(child.wait(), 10)
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()

        assert got == payloads
        assert time.monotonic() - started < rules.CLAIM_LEASE.total_seconds() / 2
        assert await producer.get_pending(device) == [], "handed out, and still pending"
