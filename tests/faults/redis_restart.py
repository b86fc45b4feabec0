"""The state index restarted mid-storm: a private Redis (tests/faults/private_redis.py).

A producer store and a device store (separate broker connections, one Redis index) run flat
out on the machine's broker while Redis is taken down (SIGKILL: a crash, or SIGTERM: a clean
shutdown), kept down a moment and started again on its append-only file, under the same
processes. The server fsyncs every write (``appendfsync always``), which docs/stores.md
("Redis durability") says makes a returned enqueue survive a crash. While it is down an
enqueue must fail with :class:`StateError` (never return an id it did not store), or, in
flight when Redis went, wait until Redis can say whether it was written (a StateError that
says "not written" of a command Redis holds is a command delivered though its enqueue
failed: stale); everything acknowledged before, during and after must reach its device,
nothing stale may, and the stores must recover without a restart of their own.
"""

from __future__ import annotations

import random
import time

from tests.faults.crash import statuses_of
from tests.faults.ledger import _ANSWERS, CUT_SHORT, Tally, judge
from tests.faults.private_redis import STOPS, private_redis
from tests.faults.states import rabbitmq_on
from tests.faults.storms import storm
from tests.faults.workload import MemoryRecorder, trial_config
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique

MODES = tuple(STOPS)
DEVICES = 3
CLEAR = ("StateError", CUT_SHORT, *_ANSWERS)
"""What a call may fail with while Redis is down: the index's own error."""


async def redis_restart_trial(
    mode: str,
    rng: random.Random,
    seconds: float = 4.0,
    down_for: tuple[float, float] = (1, 2),
    *,
    met: list[int] | None = None,
) -> Tally:
    """One storm of ``seconds`` with one Redis restart in ``mode`` (down ``down_for`` seconds,
    drawn) at a random moment; returns the judged tally, with ``unclear_errors`` the calls
    that failed with anything but StateError. ``met`` gets how many calls were under way
    while Redis was down: a call whose reply was lost waits for Redis to answer whether it
    was written, so failures alone do not show that the outage was met."""
    exchange = unique("faults.")
    devices = [f"gw-{n}" for n in range(DEVICES)]
    names = [unique("faults-producer-"), unique("faults-device-")]
    recorder = MemoryRecorder()
    async with private_redis() as server:
        spec = f"redis-at:{server.url}"
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
