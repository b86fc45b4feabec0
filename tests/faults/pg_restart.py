"""The state database restarted mid-storm: a private PostgreSQL (tests/faults/private_pg.py).

A producer store and a device store (separate broker connections, one PostgreSQL index) run
flat out on the machine's broker while the database is stopped (``pg_ctl stop -m fast`` or
``-m immediate``), kept down a moment and started again, under the same processes. While it is
down an enqueue must fail with :class:`StateError` (never return an id it did not store);
everything acknowledged before, during and after must reach its device, nothing stale may,
and the stores must recover without a restart of their own.
"""

from __future__ import annotations

import random

from tests.faults.index_restart import index_restart_storm
from tests.faults.ledger import Tally
from tests.faults.private_pg import private_postgres

MODES = ("fast", "immediate")


async def pg_restart_trial(
    mode: str,
    rng: random.Random,
    seconds: float = 4.0,
    down_for: tuple[float, float] = (1, 2),
    met: list[int] | None = None,
) -> Tally:
    """One storm of ``seconds`` with one database restart in ``mode`` (down ``down_for``
    seconds, drawn) at a random moment; returns the judged tally, with ``unclear_errors``
    the calls that failed with anything but StateError, and ``met`` (when given) how many
    calls were under way while the database was down."""
    async with private_postgres() as server:
        return await index_restart_storm(
            server, f"sql:{server.url}", mode, rng, seconds=seconds, down_for=down_for, met=met
        )
