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

from tests.faults.index_restart import index_restart_storm
from tests.faults.ledger import Tally
from tests.faults.private_redis import STOPS, private_redis

MODES = tuple(STOPS)


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
    async with private_redis() as server:
        return await index_restart_storm(
            server, f"redis-at:{server.url}", mode, rng, seconds=seconds, down_for=down_for, met=met
        )
