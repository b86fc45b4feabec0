"""A call whose command the relay holds back behind a dead writer's commands returns soon.

A call owed to the relay returns once the relay published its command, so a call another
process begins after it returned is published after it. Behind commands a dead writer left
unpublished (found by the relay's first read, not yet past their lease) that would be a wait
of up to the lease for nothing: a live writer marks its publishes within moments, so the
call waits a second at most, and its command still goes out behind them.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.shared_index import INDEX_KINDS, drain_until, shared_index

DEVICE = "dev-held"


@pytest.mark.parametrize("kind", INDEX_KINDS)
async def test_an_enqueue_behind_a_dead_writers_command_returns_soon_and_comes_after_it(
    kind: str, tmp_path: Path
) -> None:
    # The dead writer's command is due 3 s after it was written; publish_timeout is 10 s.
    async with shared_index(kind, tmp_path, relay_after=3.0, publish_timeout=10.0) as shared:
        async with shared.store(await shared.open_index()) as writer:
            await writer.ensure_queue(DEVICE)
            left = writer.build(DEVICE, None, b"left by the dead writer", 600)
        await (await shared.open_index()).add([left])
        async with shared.store(await shared.open_index()) as restarted:
            started = time.monotonic()
            await restarted.enqueue(DEVICE, b"after the restart", 600)
            waited = time.monotonic() - started
            got = await drain_until(restarted, DEVICE, count=2, seconds=10)

    assert waited < 2.0, f"the enqueue waited {waited:.1f} s behind a dead writer's command"
    assert got == [b"left by the dead writer", b"after the restart"]
