"""No public call of a RabbitMQStore takes an outcome for a command no device received.

Found by a probe (twenty-seventh session): ``complete_received`` and ``fail_received``, the
calls a consumed command's ``complete()`` and ``fail()`` reach, were public methods of the
store that marked any id delivered before reporting: a pending command became
``SUCCEEDED``, a cancelled one (its cancel had returned) ``FAILED``, and its message was then
dropped at delivery. Rule 9: only a delivered command gets an outcome, as
``complete_command`` and ``fail_command`` hold.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import CommandStatus, QueueError, RabbitMQStore
from tests.rabbitmq_support import rabbitmq_store

REPORTS = ("complete", "fail")
Report = Callable[[str, Any], Awaitable[object]]


def outcome_calls(store: RabbitMQStore) -> dict[str, tuple[Report, object]]:
    """Every public coroutine method of the store named for an outcome, with an argument."""
    calls: dict[str, tuple[Report, object]] = {}
    for name, method in inspect.getmembers(store, inspect.iscoroutinefunction):
        if name.startswith(REPORTS):
            calls[name] = (method, "jammed" if name.startswith("fail") else b"done")
    return calls


@pytest.mark.parametrize("cancelled", [False, True], ids=["pending", "cancelled"])
async def test_no_outcome_is_taken_for_a_command_no_device_received(
    tmp_path: Path, *, cancelled: bool
) -> None:
    async with rabbitmq_store(tmp_path) as store:
        assert isinstance(store, RabbitMQStore)
        command_id = await store.enqueue("dev-1", b"x", 60)
        if cancelled:
            await store.cancel_command(command_id)
        status = await store.get_status(command_id)

        calls = outcome_calls(store)
        assert {"complete_command", "fail_command"} <= set(calls)
        for name, (method, argument) in calls.items():
            with pytest.raises(QueueError):
                await method(command_id, argument)
            assert await store.get_status(command_id) is status, name

        assert await store.drain_pending("dev-1") == ([] if cancelled else [b"x"])


async def test_a_received_commands_report_is_for_that_command_only(tmp_path: Path) -> None:
    """A review of the fix above: the report a consumed command carried took any id
    (``dataclasses.replace(command, id=other).fail(...)``, or its reporter called with
    another id), so a pending command of another device ended ``FAILED``."""
    async with rabbitmq_store(tmp_path) as store:
        assert isinstance(store, RabbitMQStore)
        received_id = await store.enqueue("dev-1", b"x", 60)
        other = await store.enqueue("dev-2", b"y", 60)

        async with store.consume("dev-1") as stream:
            async for command in stream:
                await dataclasses.replace(command, id=other).fail("jammed")
                break

        assert await store.get_status(other) is CommandStatus.PENDING
        assert await store.get_status(received_id) is CommandStatus.FAILED
        assert await store.drain_pending("dev-2") == [b"y"]
