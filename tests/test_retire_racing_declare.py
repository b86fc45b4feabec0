"""A stream on a device retired while the retiring store enqueued to it.

RabbitMQ (3.10, classic queues) deleting a queue while another channel declares it again may
leave the deleted queue's consumer on the new queue, never cancelled: the new queue's
messages went to it unacknowledged, its channel dropped them, and the stream (which ends on
the broker's cancel) waited for ever; every later command of the device stayed pending. An
enqueue racing a retire on the same store did that: the retire forgets the queue's
declaration before deleting it, and the enqueue declared it again on another declaring
channel while the deletion was under way (aiormq alone, with no store, shows the broker doing
it in 6 to 14 of 60 tries). The broker's race is a matter of a millisecond, so
the test retires the device many times, the enqueue sent just after each deletion.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiormq
import pytest

from tests.support import eventually
from tests.test_adversarial_seams import LONG, Env, env_on

ROUNDS = 30


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    # The race is the broker's: one index backend shows it.
    async with env_on("sqlite", tmp_path, prefix="retirerace.") as shared:
        yield shared


@pytest.mark.timeout(120)
async def test_a_stream_hears_every_retire_that_an_enqueue_raced(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = env.device()
    gateway = await env.open()
    operator = await env.open()
    deleting = asyncio.Event()
    delete = aiormq.Channel.queue_delete

    async def signalled_delete(channel: aiormq.Channel, *args: Any, **kwargs: Any) -> Any:
        call = asyncio.ensure_future(delete(channel, *args, **kwargs))
        await asyncio.sleep(0)  # its frame on its way
        deleting.set()
        return await call

    monkeypatch.setattr(aiormq.Channel, "queue_delete", signalled_delete)
    got: set[str] = set()
    streams = 0

    async def gateway_loop() -> None:
        # As a gateway does: a stream that ended (its device retired) is opened again.
        nonlocal streams
        while True:
            streams += 1
            async with gateway.consume(device) as stream:
                async for command in stream:
                    got.add(command.id)

    loop = asyncio.ensure_future(gateway_loop())
    try:
        for round_ in range(ROUNDS):
            await operator.enqueue(device, b"before the retire", LONG)
            deleting.clear()
            retire = asyncio.ensure_future(operator.retire_device(device))
            await deleting.wait()
            await asyncio.sleep((0.0, 0.001, 0.002)[round_ % 3])
            await operator.enqueue(device, b"racing the retire", LONG)
            await retire
            after = await operator.enqueue(device, b"after the retire", LONG)

            async def arrived(command_id: str = after) -> bool:
                return command_id in got

            try:
                await eventually(arrived, 5)
            except TimeoutError:
                status = (await operator.get_status(after)).value
                pytest.fail(
                    f"round {round_}: the command enqueued after the retire is {status}, not "
                    f"delivered ({streams} streams opened)"
                )
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
