"""Shared test helpers: a controllable clock and unique names."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

T = TypeVar("T")

FULL_MATRIX = os.environ.get("AMQP_QUEUE_FULL_MATRIX") == "1"
"""Set by ``make reliability``: the long adversarial rounds run every combination."""


def matrix(every: Sequence[T], short: Sequence[T]) -> list[T]:
    """A test's parameters: ``every`` combination under ``make reliability``, ``short`` (a
    few, chosen to cover each backend once) in the test command, which must stay under
    ten minutes."""
    return list(every if FULL_MATRIX else short)


class FakeClock:
    """A clock that moves only when told to, so expiry is tested without sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def unique(prefix: str) -> str:
    """A name no other test uses (queues, exchanges, schemas, devices)."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


async def eventually(condition: Callable[[], Awaitable[bool]], seconds: float) -> None:
    """Waits until ``condition()`` holds, asking every 0.1 s; fails after ``seconds``."""
    async with asyncio.timeout(seconds):
        while not await condition():  # noqa: ASYNC110 - polling a remote state, no event
            await asyncio.sleep(0.1)


async def dumping_tasks_after(seconds: float, awaitable: Awaitable[T]) -> T:
    """Awaits ``awaitable``; past ``seconds``, prints every asyncio task's stack (what a hang
    waits on, which pytest-timeout's thread dump does not show) and fails the test."""
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError:
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stdout)
        raise


def seeded() -> random.Random:
    """A random source whose seed the test prints, so a failing run can be told apart;
    AMQP_QUEUE_SEED replays a printed seed (the faults' timing still varies run to run)."""
    given = os.environ.get("AMQP_QUEUE_SEED")
    seed = int(given) if given else random.randrange(2**32)
    print(f"random seed: {seed}")
    return random.Random(seed)
