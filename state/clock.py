"""Time source for the stores, injectable so expiry can be tested without sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

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


class Advancing:
    """The store clock's now when made, advanced by the time elapsed since (monotonic) when
    the clock is the wall clock: what a call reads once it holds its command or its lock,
    also on SQLite's writer thread, where the store's own clock (the application's, maybe
    bound to the event loop) is not called. Made by :func:`advancing`."""

    def __init__(self, now: datetime, *, moves: bool = True) -> None:
        self._now = now
        self._moves = moves
        self._made = time.monotonic()

    def __call__(self) -> datetime:
        if not self._moves:
            return self._now
        return self._now + timedelta(seconds=time.monotonic() - self._made)


def advancing(clock: Clock, now: datetime | None = None) -> Advancing:
    """``now`` (else ``clock()``), advanced as time passes if ``clock`` is the wall clock.

    A clock of the application's own (a test's fake clock) moves only when it says so: a
    call's time advanced by real seconds would run ahead of it, and a later call, stamped
    by that clock a tick on, would read as older (a confirmation's ready time after the
    next enqueue's, and the device given them out of order)."""
    return Advancing(clock() if now is None else now, moves=clock is utc_now)
