"""What other stores see while a drain cut short gives its claim back (found by a helper's
probes in the sixteenth session; a known limit, docs/reliability.md).

A drain claims its commands in the index (marks them delivered) before it hands them over; cut
short (a deadline, a cancelled task) it gives them back, open again. Between the two, every
other store reads the claim as a delivery: ``get_status`` says DELIVERED and then PENDING, an
outcome reported meanwhile is accepted and keeps the command from ever being handed out, and
the device's open commands do not count the claimed ones, so enqueues meanwhile take it over
its limit once they are back. The fix is a two-phase claim (claimed, then handed over), which
these tests wait for: each runs until it sees the effect, for a few seconds at most.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path

import pytest

from amqp_queue import CommandStatus, Limits, QueueError, QueueFull, RabbitMQStore
from tests.test_adversarial_seams import env_on

BACKENDS = ["sqlite", "postgres", "redis"]
LOOK_FOR = 8.0  # seconds each test looks for the effect
LIMIT = (
    "known limit (docs/reliability.md): a drain's claim reads as a delivery to other stores "
    "until the drain hands it over or gives it back; the fix is a two-phase claim"
)


async def _cut_drains(
    store: RabbitMQStore, device: str, stop: asyncio.Event, got: set[str] | None = None
) -> None:
    """Drains cut short at random moments: each gives back what it had claimed; ``got``
    collects what those that returned in time handed over."""
    rng = random.Random()
    while not stop.is_set():
        try:
            records = await asyncio.wait_for(store.drain_commands(device), rng.uniform(0.005, 0.1))
        except TimeoutError:
            pass
        else:
            if got is not None:
                got.update(record.id for record in records)
        await asyncio.sleep(rng.uniform(0, 0.01))


async def _until(seen: Callable[[], Awaitable[bool]], stop: asyncio.Event) -> bool:
    """Whether ``seen`` said so within LOOK_FOR seconds; sets ``stop`` either way."""
    give_up = time.monotonic() + LOOK_FOR
    try:
        while time.monotonic() < give_up:
            if await seen():
                return True
            await asyncio.sleep(0.001)  # the others run even while nothing is to be read
        return False
    finally:
        stop.set()


async def _producing(
    store: RabbitMQStore, device: str, ids: list[str], stop: asyncio.Event
) -> None:
    """Bursts of enqueues, so the drains find backlogs to claim."""
    rng = random.Random()
    while not stop.is_set():
        for _ in range(rng.randint(1, 30)):
            with suppress(QueueFull):  # the limit test's device is full most of the time
                ids.append(await store.enqueue(device, b"x", 600))
        await asyncio.sleep(rng.uniform(0, 0.05))


def _not_handed(ids: list[str], got: set[str]) -> list[str]:
    """The latest commands no drain has returned: those a drain may be claiming now."""
    return [command_id for command_id in ids if command_id not in got][-40:]


@pytest.mark.xfail(strict=True, reason=LIMIT)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_no_status_goes_from_delivered_back_to_pending(backend: str, tmp_path: Path) -> None:
    async with env_on(backend, tmp_path, prefix="giveback.") as env:
        producer, reader, drainer = await env.open(), await env.open(), await env.open()
        device, ids, stop = env.device(), list[str](), asyncio.Event()
        said_delivered: set[str] = set()
        got: set[str] = set()

        async def went_back() -> bool:
            for command_id in _not_handed(ids, got):
                status = await reader.get_status(command_id)
                if status is CommandStatus.DELIVERED:
                    said_delivered.add(command_id)
                elif status is CommandStatus.PENDING and command_id in said_delivered:
                    return True
            return False

        tasks = [_producing(producer, device, ids, stop), _cut_drains(drainer, device, stop, got)]
        running = [asyncio.create_task(task) for task in tasks]
        went = await _until(went_back, stop)
        await asyncio.gather(*running)

        assert not went, "a status said DELIVERED, then PENDING: delivered to nobody meanwhile"


@pytest.mark.xfail(strict=True, reason=LIMIT)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_outcome_is_refused_for_a_command_no_device_got(
    backend: str, tmp_path: Path
) -> None:
    async with env_on(backend, tmp_path, prefix="giveback.") as env:
        producer, reporter, drainer = await env.open(), await env.open(), await env.open()
        device, ids, stop = env.device(), list[str](), asyncio.Event()
        accepted: list[str] = []
        got: set[str] = set()

        async def reported() -> bool:
            for command_id in _not_handed(ids, got):
                if await reporter.get_status(command_id) is CommandStatus.DELIVERED:
                    try:
                        await reporter.complete_command(command_id, b"done")
                    except QueueError:
                        continue
                    accepted.append(command_id)
            # Most were handed over by drains that returned; which were given back is known
            # at the end: this runs the whole LOOK_FOR.
            return False

        tasks = [_producing(producer, device, ids, stop), _cut_drains(drainer, device, stop, got)]
        running = [asyncio.create_task(task) for task in tasks]
        await _until(reported, stop)
        await asyncio.gather(*running)
        got |= await _drain_all(drainer, device)

        ended = [c for c in accepted if await reporter.get_status(c) is CommandStatus.SUCCEEDED]
        never_got = [c for c in ended if c not in got]
        assert never_got == [], "outcomes accepted for commands no drain returned"


async def _drain_all(store: RabbitMQStore, device: str) -> set[str]:
    got: set[str] = set()
    for _ in range(3):
        got |= {record.id for record in await store.drain_commands(device)}
        await asyncio.sleep(0.3)
    return got


@pytest.mark.xfail(strict=True, reason=LIMIT)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_device_never_holds_more_open_commands_than_its_limit(
    backend: str, tmp_path: Path
) -> None:
    most = 5
    async with env_on(backend, tmp_path, prefix="giveback.") as env:
        stores = [await env.open(limits=Limits(max_pending_per_device=most)) for _ in range(3)]
        producer, reader, drainer = stores
        device, ids, stop = env.device(), list[str](), asyncio.Event()

        async def over() -> bool:
            return len(await reader.get_pending(device)) > most

        tasks = [_producing(producer, device, ids, stop), _cut_drains(drainer, device, stop)]
        running = [asyncio.create_task(task) for task in tasks]
        went_over = await _until(over, stop)
        await asyncio.gather(*running)

        assert not went_over, f"more than {most} open commands on one device"
