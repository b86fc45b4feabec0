"""A confirm that finds its command (or its rollout) made ready by another call waits for that
call's publish before it returns: a command enqueued after it returned must not go first.

Both calls run in one store here (the other-process case is round 13's first test): its
broker link is held while the first call publishes, and released a moment after the second
call began. Every index, the real broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from amqp_queue import CommandStatus, RabbitMQStore
from tests.support import matrix
from tests.tcp_proxy import StallProxy
from tests.test_adversarial_ninth import LONG, space_on, take

ALL = ["sqlite", "postgres", "redis"]
WAITING = CommandStatus.AWAITING_CONFIRMATION
HELD = 0.4  # seconds the broker link is held after the second call began
pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


async def _then_later(
    store: RabbitMQStore, reader: RabbitMQStore, link: StallProxy, devices: list[str], call: str
) -> dict[str, list[bytes]]:
    """Runs ``call`` (a repeated confirm) while the first confirm's publish is held, then a
    plain enqueue to each device through ``reader`` (its own link); returns what each device's
    stream got, in order."""

    async def resume_later() -> None:
        await asyncio.sleep(HELD)
        link.resume()

    resuming = asyncio.create_task(resume_later())
    await asyncio.wait_for(store_call(store, call), 15)
    for device in devices:
        await reader.enqueue(device, b"later", LONG)
    await resuming
    return {d: [p for _, p in await take(reader, d, {b"first", b"later"}, 5)] for d in devices}


def store_call(store: RabbitMQStore, call: str) -> asyncio.Future[object]:
    kind, _, target = call.partition(":")
    if kind == "command":
        return asyncio.ensure_future(store.confirm_command(target))
    return asyncio.ensure_future(store.confirm_rollout(target))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", matrix(ALL, ["sqlite"]))
async def test_a_repeated_confirm_in_one_store_waits_for_the_first_ones_publish(
    backend: str, tmp_path: Path
) -> None:
    """Confirming twice through one store: the second call found the command in flight and
    returned at once, and a command enqueued after it reached the device first."""
    async with StallProxy(5672, max_connections=8) as link, space_on(backend, tmp_path) as sp:
        device = sp.device()
        store, reader = await sp.open(link.amqp_url), await sp.open()
        cid = await store.enqueue_with_confirmation(device, "fw", b"first", LONG)
        link.stall()
        first = asyncio.create_task(store.confirm_command(cid))
        async with asyncio.timeout(10):
            while not (await reader.get_command(cid)).confirmed:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        got = await _then_later(store, reader, link, [device], f"command:{cid}")
        await asyncio.wait_for(first, 15)
    assert got == {device: [b"first", b"later"]}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", matrix(ALL, ["postgres"]))
async def test_a_repeated_rollout_confirm_waits_for_the_first_ones_publishes(
    backend: str, tmp_path: Path
) -> None:
    """Two confirms of one rollout, the first one's publishes held: the second confirmed
    nothing and returned at once, and commands enqueued after it went first."""
    async with StallProxy(5672, max_connections=8) as link, space_on(backend, tmp_path) as sp:
        devices = [sp.device() for _ in range(3)]
        first_store, second_store = await sp.open(link.amqp_url), await sp.open()
        reader = await sp.open()
        rollout = await first_store.enqueue_many(
            devices, b"first", LONG, command_type="fw", requires_confirmation=True
        )
        link.stall()
        first = asyncio.create_task(first_store.confirm_rollout(rollout.rollout_id))
        async with asyncio.timeout(10):
            while (await reader.rollout_summary(rollout.rollout_id)).counts[WAITING]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        got = await _then_later(
            second_store, reader, link, devices, f"rollout:{rollout.rollout_id}"
        )
        assert await asyncio.wait_for(first, 15) == len(devices)
    assert got == {device: [b"first", b"later"] for device in devices}
