"""Shared test helpers: a controllable clock and unique names."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta


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
