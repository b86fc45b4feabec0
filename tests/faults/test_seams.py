"""Short form of the seam trials (``make reliability`` runs more, and longer).

No fault is injected, so the contract leaves no room at all: every command that reached the
index is handed out exactly once, in its producer's order, within a few seconds, nothing
stale, and each is published to the broker once (docs/design.md, "RabbitMQ delivery").
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.faults.seams import busy_gateways_trial, cancelled_enqueues_trial
from tests.faults.states import STATE_KINDS

pytestmark = pytest.mark.slow


def _shown(figures: dict[str, int]) -> str:
    return " ".join(f"{name}={count}" for name, count in figures.items())


@pytest.mark.parametrize("state_kind", STATE_KINDS)
async def test_gateways_sharing_devices_with_busy_producers_hand_out_each_command_once_in_order(
    state_kind: str, tmp_path: Path
) -> None:
    """Producer stores, consume() streams and drains on other stores, a relay loop and
    short-lived stores, all on the same devices at once."""
    tally = await busy_gateways_trial(
        random.Random(f"busy/{state_kind}"), state_kind, tmp_path, seconds=2.0
    )

    assert tally.accepted > 0
    assert tally.delivered > 0
    assert tally.errors == 0
    figures = {
        "lost": tally.lost,
        "duplicates": tally.duplicates,
        "out_of_order": tally.out_of_order,
        "stale": tally.stale,
        "wrong_status": tally.wrong_status,
        "dup_publishes": tally.dup_publishes,
        "outbox_left": tally.outbox_left,
    }
    assert figures == dict.fromkeys(figures, 0), _shown(figures)


@pytest.mark.parametrize("state_kind", STATE_KINDS)
async def test_an_enqueue_cancelled_midway_is_delivered_once_in_order_and_promptly_or_not_at_all(
    state_kind: str, tmp_path: Path
) -> None:
    """Enqueue calls cut short by asyncio.timeout or Task.cancel at random moments; the
    relay's periodic pass is a minute apart, so nothing may be left to it."""
    tally = await cancelled_enqueues_trial(
        random.Random(f"cancelled/{state_kind}"), state_kind, tmp_path, seconds=1.5
    )

    assert tally.cut_short > 0
    assert tally.accepted > 0
    assert tally.errors == 0
    figures = {
        "lost": tally.lost,
        "duplicates": tally.duplicates,
        "out_of_order": tally.out_of_order,
        "late": tally.late,
        "stale": tally.stale,
        "dup_publishes": tally.dup_publishes,
        "outbox_left": tally.outbox_left,
    }
    assert figures == dict.fromkeys(figures, 0), _shown(figures)
