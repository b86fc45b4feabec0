"""The storm both index-restart trials run (tests/faults/pg_restart.py, redis_restart.py).

A producer store and a device store (separate broker connections, one state index) run flat
out on the machine's broker while the index's private server is stopped in some ``mode``, kept
down a moment and started again, under the same processes.
"""

from __future__ import annotations

import random
import time
from typing import Protocol

from tests.faults.crash import statuses_of
from tests.faults.ledger import _ANSWERS, CUT_SHORT, Tally, judge
from tests.faults.states import rabbitmq_on
from tests.faults.storms import storm
from tests.faults.workload import MemoryRecorder, trial_config
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique

DEVICES = 3
CLEAR = ("StateError", CUT_SHORT, *_ANSWERS)
"""What a call may fail with while the index is down: the index's own error."""


class Restartable(Protocol):
    async def restart(self, mode: str, down_for: float = 0.0) -> None: ...


async def index_restart_storm(
    server: Restartable,
    spec: str,
    mode: str,
    rng: random.Random,
    *,
    seconds: float,
    down_for: tuple[float, float],
    met: list[int] | None = None,
) -> Tally:
    """One storm of ``seconds`` on the state ``spec`` names, with ``server`` restarted once in
    ``mode`` (down ``down_for`` seconds, drawn) at a random moment; the judged tally, with
    ``unclear_errors`` the calls that failed with anything but StateError. ``met`` gets how
    many calls were under way while the server was down (a call whose answer was lost may wait
    for the server to say whether it was written, so failures alone do not show the outage
    was met)."""
    exchange = unique("faults.")
    devices = [f"gw-{n}" for n in range(DEVICES)]
    names = [unique("faults-producer-"), unique("faults-device-")]
    recorder = MemoryRecorder()
    urls = [f"{AMQP_URL}?name={name}&reconnect_interval=0.2" for name in names]
    config = trial_config(exchange)
    outage: list[float] = []

    async def inject() -> None:
        outage.append(time.monotonic())
        await server.restart(mode, rng.uniform(*down_for))
        outage.append(time.monotonic())

    try:
        async with (
            rabbitmq_on(spec, urls[0], config) as producer_store,
            rabbitmq_on(spec, urls[1], config) as device_store,
        ):
            outbox_left = await storm(
                producer_store, device_store, devices, recorder, inject, rng, seconds, once=True
            )
            statuses = await statuses_of(producer_store, recorder.ops)
    finally:
        await delete_namespace(exchange, devices)
    if met is not None and outage:
        down, up = outage
        met.append(sum(1 for op in recorder.ops if op.started < up and (op.returned or up) > down))
    tally = judge(recorder.ops, recorder.deliveries, statuses)
    tally.outbox_left = outbox_left
    tally.unclear_errors = sum(1 for op in recorder.ops if op.error not in (None, *CLEAR))
    return tally
