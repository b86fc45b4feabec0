"""``is_deliverable``: the one-command liveness check consume() makes before each hand-out.

Every index backend answers it like ``deliverable``; SQLite answers it on the calling thread
from a read-only connection of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from state.base import IndexedStore
from tests.backends import BACKENDS
from tests.support import FakeClock


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
async def indexed(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[IndexedStore]:
    async with BACKENDS[request.param](tmp_path, clock=clock) as store:
        assert isinstance(store, IndexedStore)
        yield store


async def test_only_open_ready_unexpired_commands_are_deliverable(
    indexed: IndexedStore, clock: FakeClock
) -> None:
    ready = await indexed.enqueue("dev-1", b"ready", 600)
    waiting = await indexed.enqueue_with_confirmation("dev-1", "unlock", b"w", 600)
    confirmed = await indexed.enqueue_with_confirmation("dev-1", "open", b"c", 600)
    await indexed.confirm_command(confirmed)
    superseded = await indexed.enqueue_or_update("dev-1", "setpoint", b"20", 600)
    replacement = await indexed.enqueue_or_update("dev-1", "setpoint", b"21", 600)
    cancelled = await indexed.enqueue("dev-1", b"no", 600)
    await indexed.cancel_command(cancelled)
    delivered = await indexed.enqueue("dev-2", b"d", 600)
    await indexed.drain_pending("dev-2")
    expiring = await indexed.enqueue("dev-1", b"e", 5)
    clock.advance(5)

    answers = {
        command_id: await indexed.is_deliverable(command_id)
        for command_id in (
            ready,
            waiting,
            confirmed,
            superseded,
            replacement,
            cancelled,
            delivered,
            expiring,
            str(uuid.uuid4()),
        )
    }

    assert [command_id for command_id, live in answers.items() if live] == [
        ready,
        confirmed,
        replacement,
    ]
    assert set(await indexed.deliverable(list(answers))) == {ready, confirmed, replacement}
