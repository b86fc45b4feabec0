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

from amqp_queue.state import CommandRecord, SqlStore, StateError
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


class _ConfirmAnswerLost(SqlStore):
    """Its confirmations land, and their answers are lost on the way back."""

    async def confirm_changed(
        self, command_id: str, *, by: str | None = None
    ) -> tuple[CommandRecord, bool]:
        await super().confirm_changed(command_id, by=by)
        raise StateError("the confirmation's answer was lost")


async def test_a_confirmation_whose_answer_was_lost_is_published_before_a_later_enqueue(
    tmp_path: Path,
) -> None:
    """A confirm that landed though the caller was told it failed: a retry finds it confirmed
    and changes nothing, so the relay must publish it; ahead of what is enqueued after."""
    async with shared_index("sqlite", tmp_path) as shared:
        async with shared.store(await shared.open_index()) as writer:
            await writer.ensure_queue(DEVICE)
            awaiting = await writer.enqueue_with_confirmation(DEVICE, "reboot", b"approved", 600)
        async with shared.store(await shared.open_index(_ConfirmAnswerLost)) as operator:
            with pytest.raises(StateError):
                await operator.confirm_command(awaiting)
            await operator.enqueue(DEVICE, b"after the approval", 600)
            got = await drain_until(operator, DEVICE, count=2, seconds=10)

    assert got == [b"approved", b"after the approval"]
