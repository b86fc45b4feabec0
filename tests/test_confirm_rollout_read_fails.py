"""``confirm_rollout`` whose confirmation landed answers so, whatever its later reads meet.

Found by the twenty-seventh session's probe (Redis killed, PostgreSQL restarted during the
confirm; up to 9 of 10 trials): after its write and its publishes, the call reads the
rollout again for members another call confirmed, and that read's failure reached the
caller as a ``StateError``, which says nothing was written, while every member read
``PENDING`` and the next drain delivered them. The confirm landed: it returns.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from amqp_queue import RabbitMQStore, StateError
from tests.rabbitmq_support import rabbitmq_store
from tests.shared_index import drain_until


async def test_a_failed_read_after_the_confirm_landed_is_not_the_callers_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rabbitmq_store(tmp_path) as store:
        assert isinstance(store, RabbitMQStore)
        devices = ["dev-1", "dev-2"]
        rollout = await store.enqueue_many(
            devices, b"go", 600, command_type="firmware", requires_confirmation=True
        )

        async def index_down(rollout_id: str) -> list[str]:
            raise StateError("state index read failed: the connection was lost")

        monkeypatch.setattr(store.state, "rollout_unpublished", index_down)

        assert await store.confirm_rollout(rollout.rollout_id) == 2

        for device in devices:
            assert await drain_until(store, device, count=1, seconds=5) == [b"go"]
