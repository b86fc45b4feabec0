"""Review of the repeated confirm_rollout (f48b22b): the second call polls the index for the
first call's publishes for WRITER_GRACE (1 s) only, then publishes every member still
unmarked itself. A fan-out of a few thousand devices takes longer than that to publish in
normal operation, so confirming a large rollout twice at once (a double click in the
console, two operators, an API retry) publishes most of the fan-out twice: no fault at all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiormq.abc import DeliveredMessage

from amqp_queue import RabbitMQStore
from tests.support import matrix
from tests.test_adversarial_ninth import LONG, space_on

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def _counted(store: RabbitMQStore, into: list[str]) -> None:
    """Counts the sends the broker confirmed (a publish that joins a send still under way,
    or answers from one confirmed late, sends nothing)."""
    publisher: Any = store._path._publisher
    send: Callable[..., Any] = publisher._basic_publish

    async def counted(record: Any, properties: Any) -> Any:
        result = await send(record, properties)
        if not isinstance(result, DeliveredMessage):
            into.append(record.id)
        return result

    publisher._basic_publish = counted


@pytest.mark.timeout(240)
@pytest.mark.parametrize("devices", matrix([1500], [1100]))  # past FAN_OUT_IN_FLIGHT: relayed
async def test_a_large_rollout_confirmed_twice_is_published_once(
    devices: int, tmp_path: Path
) -> None:
    async with space_on("sqlite", tmp_path) as sp:
        a, b = await sp.open(), await sp.open()
        ids = [sp.device() for _ in range(devices)]
        rollout = await a.enqueue_many(
            ids, b"fw", LONG, command_type="fw", requires_confirmation=True
        )
        by_a: list[str] = []
        by_b: list[str] = []
        _counted(a, by_a)
        _counted(b, by_b)
        began = time.monotonic()
        first = asyncio.ensure_future(a.confirm_rollout(rollout.rollout_id))
        await asyncio.sleep(0.05)
        second = await asyncio.wait_for(b.confirm_rollout(rollout.rollout_id), 120)
        confirmed = await asyncio.wait_for(first, 120)
        took = time.monotonic() - began
        print(
            f"A confirmed {confirmed}, B {second}; {took:.1f} s; published by A "
            f"{len(by_a)}, by B {len(by_b)}"
        )
        assert confirmed + second == devices
        copies = len(by_a) + len(by_b) - devices
        assert copies <= devices // 100, f"{copies} copies of {devices} published"
