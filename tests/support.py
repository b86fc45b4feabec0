"""Shared test helpers: a controllable clock and unique names."""

from __future__ import annotations

import uuid
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
