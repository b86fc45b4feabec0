"""Time source for the stores, injectable so expiry can be tested without sleeping."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]
"""Returns the current time as a timezone-aware UTC datetime."""


def utc_now() -> datetime:
    """The wall clock, timezone-aware UTC."""
    return datetime.now(UTC)


def checked(clock: Clock) -> Clock:
    """``clock``, once it has told an aware time (told in UTC if it is in another zone): a
    naive one would fail later, deep in a driver or a comparison, as whatever each backend
    makes of it.

    Raises:
        ValueError: ``clock`` is not callable, or returned something other than a
            timezone-aware datetime.
    """
    if not callable(clock):
        raise ValueError(f"clock must be callable, got {clock!r}")
    now = clock()
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise ValueError(f"clock must return a timezone-aware UTC datetime, returned {now!r}")
    if now.utcoffset():
        # Aware in another zone: the same instants, told in UTC as every record keeps them.
        return lambda: clock().astimezone(UTC)
    return clock
