"""What other stores see while a drain cut short gives its claim back (found by a helper's
probes in the sixteenth session, fixed in the seventeenth: docs/reliability.md).

A drain claims its commands in the index before it hands them over; cut short (a deadline, a
cancelled task) it gives them back, open again. When the claim marked them delivered, every
other store read it as a delivery meanwhile: ``get_status`` said DELIVERED, an outcome
reported meanwhile was accepted (and kept the command from ever being handed out), and the
device's open commands did not count the claimed ones, so enqueues meanwhile took it over its
limit once they were back. The probes saw each within seconds on every backend, with drains
cut at random; here the drain's claim is held open once committed, so each effect showed
every time. A claim now holds its commands open, and only the hand-over marks them delivered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import CommandStatus, Limits, QueueError, QueueFull, RabbitMQStore
from amqp_queue.state import rules
from tests import drain_dies_child
from tests.rabbitmq_support import AMQP_URL
from tests.test_adversarial_seams import Handout, consume_until, env_on

BACKENDS = ["sqlite", "postgres", "redis"]


@asynccontextmanager
async def drain_cut_after_its_claim(
    store: RabbitMQStore, device: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[None]:
    """A drain of ``device`` on ``store`` whose claim has committed, held there while the body
    runs, then cut short (cancelled): it gives its claim back before this returns."""
    claim = store.state.claim
    claimed, release = asyncio.Event(), asyncio.Event()

    async def held(device_id: str, command_ids: Any = None) -> Any:
        records = await claim(device_id, command_ids)
        claimed.set()
        await release.wait()
        return records

    monkeypatch.setattr(store.state, "claim", held)
    drain = asyncio.create_task(store.drain_pending(device))
    try:
        async with asyncio.timeout(10):
            await claimed.wait()
        yield
    finally:
        drain.cancel()
        release.set()
        with suppress(asyncio.CancelledError):
            await drain
        monkeypatch.setattr(store.state, "claim", claim)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_command_being_claimed_reads_pending_to_others(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with env_on(backend, tmp_path, prefix="giveback.") as env:
        producer, reader, drainer = await env.open(), await env.open(), await env.open()
        device = env.device()
        ids = [await producer.enqueue(device, b"%d" % n, 600) for n in range(3)]

        async with drain_cut_after_its_claim(drainer, device, monkeypatch):
            during = [await reader.get_status(command_id) for command_id in ids]
        after = [await reader.get_status(command_id) for command_id in ids]

        assert after == [CommandStatus.PENDING] * 3  # given back: nobody got them
        assert during == after, "DELIVERED while claimed, then PENDING: delivered to nobody"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_outcome_is_refused_for_a_command_no_device_got(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with env_on(backend, tmp_path, prefix="giveback.") as env:
        producer, reporter, drainer = await env.open(), await env.open(), await env.open()
        device = env.device()
        command_id = await producer.enqueue(device, b"open", 600)

        refused = False
        async with drain_cut_after_its_claim(drainer, device, monkeypatch):
            try:
                await reporter.complete_command(command_id, b"done")
            except QueueError:
                refused = True
        got = await drainer.drain_pending(device)

        assert got == [b"open"] or refused, (
            f"outcome accepted, status {await reporter.get_status(command_id)}, "
            f"and no device got the command ({got})"
        )


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_device_never_holds_more_open_commands_than_its_limit(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    most = 3
    async with env_on(backend, tmp_path, prefix="giveback.") as env:
        stores = [await env.open(limits=Limits(max_pending_per_device=most)) for _ in range(3)]
        producer, reader, drainer = stores
        device = env.device()
        for n in range(most):
            await producer.enqueue(device, b"%d" % n, 600)

        async with drain_cut_after_its_claim(drainer, device, monkeypatch):
            with suppress(QueueFull):
                await producer.enqueue(device, b"one more", 600)
        pending = await reader.get_pending(device)

        assert len(pending) <= most, f"{len(pending)} open commands, over the limit of {most}"


async def _drain_held_while(
    drainer: RabbitMQStore, device: str, monkeypatch: pytest.MonkeyPatch, meanwhile: Any
) -> list[bytes]:
    """A drain of ``device`` whose claim, once committed, waits for ``meanwhile()``; then it
    goes on to its hand-over and returns."""
    claim = drainer.state.claim
    claimed = asyncio.Event()

    async def held(device_id: str, command_ids: Any = None) -> Any:
        records = await claim(device_id, command_ids)
        claimed.set()
        await meanwhile()
        return records

    monkeypatch.setattr(drainer.state, "claim", held)
    try:
        drain = asyncio.create_task(drainer.drain_pending(device))
        async with asyncio.timeout(10):
            await claimed.wait()
            return await drain
    finally:
        monkeypatch.setattr(drainer.state, "claim", claim)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_command_cancelled_or_replaced_while_claimed_is_not_handed_out(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim leaves its commands open: an operator's cancel or a replacement between the
    claim and the hand-over wins, and the drain hands out neither."""
    async with env_on(backend, tmp_path, prefix="giveback.") as env:
        operator, drainer = await env.open(), await env.open()
        device = env.device()
        kept = await operator.enqueue(device, b"kept", 600)
        cancelled = await operator.enqueue(device, b"cancelled", 600)
        replaced = await operator.enqueue_or_update(device, "setpoint", b"20", 600)
        newer: list[str] = []

        async def meanwhile() -> None:
            await operator.cancel_command(cancelled)
            newer.append(await operator.enqueue_or_update(device, "setpoint", b"21", 600))

        got = await _drain_held_while(drainer, device, monkeypatch, meanwhile)
        statuses = [await operator.get_status(i) for i in (kept, cancelled, replaced, *newer)]
        then = await drainer.drain_pending(device)

        assert got == [b"kept"]
        assert statuses == [
            CommandStatus.DELIVERED,
            CommandStatus.CANCELLED,
            CommandStatus.SUPERSEDED,
            CommandStatus.PENDING,
        ]
        assert then == [b"21"]


@pytest.mark.parametrize("reader", ["consume", "drain"])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_what_a_drain_that_died_after_its_claim_held_reaches_the_device_at_once(
    backend: str, reader: str, tmp_path: Path
) -> None:
    """The claim of a process that died before its hand-over would keep its commands from
    every device until it lapsed, and a stream or drain reading their requeued messages
    meanwhile would drop them as not deliverable: lost. A reader that gets a claimed
    command's message redelivered ends the claim and hands the command out, in its place."""
    async with env_on(backend, tmp_path, prefix="giveback.") as env:
        producer = await env.open()
        device = env.device()
        payloads = [b"%d" % n for n in range(5)]
        for payload in payloads:
            await producer.enqueue(device, payload, 600)

        child = await drain_dies_child.spawn(AMQP_URL, env.state_url, env.exchange, device)
        out, _ = await asyncio.wait_for(child.communicate(), 30)
        assert out.decode().split() == ["claimed", "5"]
        assert [await producer.get_status(c.id) for c in await producer.get_pending(device)] == [
            CommandStatus.PENDING
        ] * 5

        started = time.monotonic()
        if reader == "consume":
            got: list[Handout] = []
            done = lambda: len(got) == len(payloads)  # noqa: E731
            await consume_until(producer, device, got, done=done, idle=10)
            received = [handout.payload for handout in got]
        else:
            # One drain, in order: the dead claims end before this drain's own claim.
            received = await producer.drain_pending(device)

        assert received == payloads
        assert time.monotonic() - started < rules.CLAIM_LEASE.total_seconds() / 2


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_drain_cancelled_once_its_hand_over_landed_returns_what_it_handed_over(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-over is the point of no return (found by a helper's probes): once it landed,
    every other store reads the commands as delivered, and may report their outcomes or
    enqueue past them. A drain cancelled then used to give them back (DELIVERED, then
    PENDING; an outcome accepted for a command no device got). It now finishes and returns
    them: the cancellation came too late to take them back."""
    async with env_on(backend, tmp_path, prefix="giveback.") as env:
        producer, reporter, drainer = await env.open(), await env.open(), await env.open()
        device = env.device()
        ids = [await producer.enqueue(device, b"%d" % n, 600) for n in range(3)]
        hand_over = drainer.state.hand_over
        landed, release = asyncio.Event(), asyncio.Event()

        async def held(claimed: Any) -> Any:
            handed = await hand_over(claimed)
            landed.set()
            await release.wait()
            return handed

        monkeypatch.setattr(drainer.state, "hand_over", held)
        drain = asyncio.create_task(drainer.drain_pending(device))
        async with asyncio.timeout(10):
            await landed.wait()
        await reporter.complete_command(ids[0], b"done")  # accepted: it reads delivered
        drain.cancel()
        release.set()
        async with asyncio.timeout(10):
            got = await drain

        assert got == [b"0", b"1", b"2"]
        assert [await reporter.get_status(i) for i in ids] == [
            CommandStatus.SUCCEEDED,
            CommandStatus.DELIVERED,
            CommandStatus.DELIVERED,
        ]
        assert await drainer.drain_pending(device) == []
