"""Short forms of the scale-out trials (``make reliability`` runs more of each).

A private PostgreSQL stopped under two stores mid-storm and started again; one of three
sidecar processes on one PostgreSQL cut off and killed. The node-loss trial needs the local
cluster and runs in tests/test_cluster.py, on the cluster that module starts.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.faults.ledger import Tally
from tests.faults.pg_restart import pg_restart_trial
from tests.faults.sidecars import sidecar_loss_trial

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def test_enqueues_fail_with_state_error_while_postgres_is_down_none_accepted_lost() -> None:
    met: list[int] = []
    tally = await pg_restart_trial("immediate", random.Random("pg-restart"), seconds=3.0, met=met)

    assert tally.accepted > 0
    # Not ``tally.errors``: a commit whose answer the outage took waits for the server to say
    # whether it landed, so every call under way may end well. tests/test_sql_commit_doubt.py
    # shows an enqueue made while the server is down fails at once.
    assert met[0] > 0, "no call met the outage"
    # Every call that failed said StateError (or the answers a live index gives).
    assert tally.unclear_errors == 0
    assert (tally.lost, tally.stale, tally.outbox_left) == (0, 0, 0)


_sidecar_tallies: list[Tally] = []


async def _sidecar_loss(tmp_path: Path) -> Tally:
    """One sidecar-loss trial for the module's two tests (it takes 15-20 s)."""
    if not _sidecar_tallies:
        _sidecar_tallies.append(
            await sidecar_loss_trial(random.Random("sidecar"), "postgres", tmp_path, seconds=5.0)
        )
    return _sidecar_tallies[0]


async def test_a_killed_sidecars_unpublished_commands_are_relayed_by_the_others(
    tmp_path: Path,
) -> None:
    tally = await _sidecar_loss(tmp_path)

    assert tally.accepted > 0
    assert tally.orphans > 0, "the victim left nothing to relay"
    # Repeats (same id) only where the victim was the consumer: others count as unclear.
    assert (tally.lost, tally.stale, tally.wrong_status, tally.unclear_errors) == (0, 0, 0, 0)
    assert (tally.outbox_left, tally.out_of_order) == (0, 0)


async def test_no_orphan_of_a_killed_sidecar_is_published_twice(tmp_path: Path) -> None:
    tally = await _sidecar_loss(tmp_path)

    assert tally.orphans > 0
    assert tally.dup_publishes == 0
