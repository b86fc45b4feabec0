"""Review of MarkCommits (shared delivery-mark commits): a commit carries up to 64 streams'
batches, each up to a prefetch window (1,000 by default) of ids, in ONE statement whose ids
are bound one parameter each. PostgreSQL takes 32,767 parameters at most: 33 streams with a
full window each make a statement the server (driver) refuses, every one of those streams'
marks fails, and since each stream keeps its unmarked ids for its next batch the retry is as
large and fails again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from amqp_queue import CommandStatus
from tests.test_adversarial_ninth import LONG, space_on

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

STREAMS, WINDOW = 40, 1000  # 40 streams, each a default prefetch window of finished ids


@pytest.mark.xfail(
    strict=True,
    reason="MarkCommits joins up to 64 windows of ids into one statement: > 32,767 binds on PG",
)
@pytest.mark.timeout(120)
async def test_forty_full_windows_marked_together_on_postgres(tmp_path: Path) -> None:
    async with space_on("postgres", tmp_path) as space:
        store = await space.open()
        device = space.device()
        real = await store.enqueue(device, b"c", LONG)
        batches = [[f"absent-{s}-{i}" for i in range(WINDOW)] for s in range(STREAMS)]
        batches[0][0] = real
        marks = store._marks  # what each stream's DeliveryMarks calls (store.py consume())
        outcomes = await asyncio.gather(
            *(marks.mark_delivered(batch) for batch in batches), return_exceptions=True
        )
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert not failed, f"{len(failed)} of {STREAMS} streams' marks failed: {failed[0]!r}"
        assert await store.get_status(real) == CommandStatus.DELIVERED
