"""``retire_device`` deletes the queue, then cancels the open commands in the index. An index
that refuses the second step for a moment (a connection cut and restored) used to leave the
commands ``PENDING`` with their messages deleted: listed by ``get_pending``, never handed out.
Found by an adversarial helper (tests cutting the index link under ``retire_device``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from amqp_queue import CommandStatus, StateError
from amqp_queue.state import SqlStore
from tests.rabbitmq_support import store_over


class RefusesRetiring(SqlStore):
    """The real SQL index; retiring fails for ``refuse_for`` seconds from the first try."""

    refuse_for = 0.0
    tries = 0
    _first: float | None = None

    async def retire_device(self, device_id: str) -> int:
        self.tries += 1
        self._first = self._first or time.monotonic()
        if time.monotonic() - self._first < self.refuse_for:
            raise StateError("state index write failed: injected")
        return await super().retire_device(device_id)


async def _refusing(tmp_path: Path, seconds: float) -> RefusesRetiring:
    state = await RefusesRetiring.connect(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    assert isinstance(state, RefusesRetiring)
    state.refuse_for = seconds
    return state


async def test_a_retire_the_index_refuses_for_a_moment_still_cancels_every_command(
    tmp_path: Path,
) -> None:
    state = await _refusing(tmp_path, 1.0)
    try:
        async with store_over(state, publish_timeout=5) as store:
            ids = [await store.enqueue("gw-old", b"%d" % n, 600) for n in range(5)]
            assert await store.retire_device("gw-old") == 5
            assert state.tries > 1
            assert {await store.get_status(i) for i in ids} == {CommandStatus.CANCELLED}
            assert await store.get_pending("gw-old") == []
    finally:
        await state.close()


async def test_a_retire_the_index_keeps_refusing_fails_and_can_be_called_again(
    tmp_path: Path,
) -> None:
    state = await _refusing(tmp_path, 3.0)
    try:
        async with store_over(state, publish_timeout=1) as store:
            ids = [await store.enqueue("gw-old", b"%d" % n, 600) for n in range(3)]
            with pytest.raises(StateError, match="call retire_device again"):
                await store.retire_device("gw-old")
            state.refuse_for = 0.0
            assert await store.retire_device("gw-old") == 3
            assert {await store.get_status(i) for i in ids} == {CommandStatus.CANCELLED}
    finally:
        await state.close()
