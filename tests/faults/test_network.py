"""Short form of the network-fault storms (``make reliability`` runs more of each).

The broker-restart storm runs on a private RabbitMQ node (tests/private_broker.py), never on
the machine's broker that other tests share; starting that node adds 5 to 9 s here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.faults.storms import storm_trial

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("fault", "state_kind"),
    [("proxy-cut", "redis"), ("server-close", "postgres"), ("broker-restart", "sqlite")],
)
async def test_nothing_is_lost_or_stale_and_the_outbox_drains_after_storms_with_faults(
    fault: str, state_kind: str, tmp_path: Path
) -> None:
    tally = await storm_trial(fault, random.Random(fault), state_kind, tmp_path, seconds=2.5)

    assert tally.accepted > 0
    assert tally.delivered > 0
    assert (tally.lost, tally.stale, tally.wrong_status, tally.outbox_left) == (0, 0, 0, 0)
