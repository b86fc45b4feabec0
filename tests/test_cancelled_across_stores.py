"""A latest-wins call cut short on one store must not land over a later call that returned on
another store sharing the index (a client timing out on one replica and sending a newer
setpoint through another).

Found by a helper's probe: the cancelled call raised at once while its group-commit write
went on in the background; a second store's write, in no batch of the first, committed
before it and was replaced when the old write landed (PostgreSQL 4 of 30 attempts, SQLite
sometimes). The later call had returned; the device got the older setpoint.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress

import pytest

from amqp_queue import CommandStatus
from tests.support import FULL_MATRIX, seeded
from tests.test_adversarial_seams import Env, env  # noqa: F401  (fixture)

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.mark.parametrize("call", ["enqueue_or_update", "enqueue_many"])
async def test_a_cut_replacement_never_lands_over_a_later_call_on_another_store(
    env: Env,  # noqa: F811
    call: str,
) -> None:
    one = await env.open()
    other = await env.open()
    rng = seeded()
    wrong: list[str] = []
    for attempt in range(30 if FULL_MATRIX else 15):  # failed 4 in 30 on PostgreSQL
        device = env.device()
        await one.ensure_queue(device)
        await other.ensure_queue(device)
        cut: asyncio.Task[object]
        if call == "enqueue_or_update":
            cut = asyncio.create_task(one.enqueue_or_update(device, "sp", b"old", 600))
        else:
            cut = asyncio.create_task(one.enqueue_many([device], b"old", 600, command_type="sp"))
        await asyncio.sleep(rng.uniform(0, 0.004))
        cut.cancel()
        with suppress(asyncio.CancelledError):
            await cut
        # The cut call has raised: the newer intent goes through another replica.
        newer = await other.enqueue_or_update(device, "sp", b"new", 600)
        await asyncio.sleep(0.2)  # time for a late write to land
        status = await other.get_status(newer)
        pending = [p.payload for p in await other.get_pending(device)]
        if status is not CommandStatus.PENDING or pending != [b"new"]:
            wrong.append(f"attempt {attempt}: newer call {status}, open {pending}")
    assert not wrong, wrong
