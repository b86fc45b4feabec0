"""``retire_device`` cut short by its caller (a deadline, a cancelled task).

It deletes the device's queue, then cancels the device's open commands in the index. A
caller's deadline landing between the two left the commands ``PENDING`` with their messages
deleted: listed by ``get_pending``, never handed out, until their TTL ran out (a helper's
probe: SQLite 19 of 43 cut retires, Redis 14 of 17, PostgreSQL 60 of 60). Once the queue's
deletion has begun, the retire now runs to its end and then raises the cancellation: a cut
retire either did nothing or cancelled the commands, as a retire that returned does.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest

from amqp_queue import CommandStatus, StateError
from tests.rabbitmq_support import rabbitmq_store
from tests.test_adversarial_seams import BACKENDS, state_url_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

ROUNDS = 30


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_cut_retire_leaves_no_command_pending_without_its_message(
    tmp_path: Path, backend: str
) -> None:
    rng = random.Random(20261207)
    stranded = []
    cut = 0
    async with (
        state_url_for(backend, tmp_path) as state_url,
        rabbitmq_store(tmp_path, state_url=state_url) as store,
    ):
        for n in range(ROUNDS):
            device = f"gw-{n}"
            ids = [await store.enqueue(device, b"c%d" % k, 60) for k in range(3)]
            try:
                await asyncio.wait_for(store.retire_device(device), rng.uniform(0, 0.02))
            except TimeoutError:
                cut += 1
            statuses = [await store.get_status(command_id) for command_id in ids]
            if CommandStatus.PENDING in statuses:
                drained = await store.drain_pending(device)
                if len(drained) != statuses.count(CommandStatus.PENDING):
                    stranded.append(f"{device}: {[s.value for s in statuses]}, drained {drained}")
    assert cut, "no retire was cut: the test proves nothing"
    assert not stranded, f"{len(stranded)} of {cut} cut retires left commands stranded: {stranded}"


async def test_a_cut_retire_the_index_refuses_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The queue is deleted, the index refuses the cancel, and the caller is cut meanwhile:
    the failure is chained to the cancellation and logged, not dropped (a reviewer's probe:
    a bare CancelledError and nothing logged, the command pending with its queue gone)."""
    async with rabbitmq_store(tmp_path, publish_timeout=1.0) as store:
        device = "gw-1"
        await store.enqueue(device, b"x", 60)

        async def refusing(device_id: str) -> int:
            raise StateError("state index unreachable")

        store.state.retire_device = refusing  # type: ignore[method-assign]
        retiring = asyncio.create_task(store.retire_device(device))
        await asyncio.sleep(0.3)  # the queue is deleted; the index is being tried again
        retiring.cancel()
        with pytest.raises(asyncio.CancelledError) as cut:
            await retiring
        assert isinstance(cut.value.__cause__, StateError)
        assert "call retire_device again" in str(cut.value.__cause__)
        logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("retire_device" in r.getMessage() for r in logged)
