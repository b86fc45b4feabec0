"""Short form of the Redis restart trials (``make reliability`` runs more of each).

A private Redis (AOF, ``appendfsync always``) taken down under two stores mid-storm, by
SIGKILL or SIGTERM, and started again on its append-only file.
"""

from __future__ import annotations

import random

import pytest

from tests.faults.redis_restart import MODES, redis_restart_trial
from tests.support import dumping_tasks_after

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.mark.parametrize("mode", MODES)
async def test_enqueues_fail_with_state_error_while_redis_is_down_none_accepted_lost(
    mode: str,
) -> None:
    met: list[int] = []
    # Seen once in the test command (7 processes, a loaded machine): the trial still ran at
    # the 120 s timeout, its event loop waking every 1.5 s; the task dump says on what.
    tally = await dumping_tasks_after(
        100, redis_restart_trial(mode, random.Random(f"redis-restart/{mode}"), seconds=3.0, met=met)
    )

    assert tally.accepted > 0
    assert met[0] > 0, "no call met the outage"
    # Every call that failed said StateError (or the answers a live index gives).
    assert tally.unclear_errors == 0
    figures = {
        "lost": tally.lost,
        "stale": tally.stale,
        "wrong_status": tally.wrong_status,
        "outbox_left": tally.outbox_left,
    }
    assert figures == dict.fromkeys(figures, 0), figures
