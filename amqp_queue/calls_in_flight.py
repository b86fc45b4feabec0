"""The calls under way that write commands and publish them, which a closing store waits for.

An enqueue that began before ``close()`` declares the device's queue, writes and publishes
on what the close takes away: met halfway, it found the channels closed, wrote its command
all the same and left it owed to a relay that was closed already. Another process's relay
published it only past ``relay_after``, behind the device's next command, enqueued
elsewhere and published at once (tests/test_enqueue_racing_close.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class CallsInFlight:
    """A count of calls under way; :meth:`wait` returns once none is."""

    def __init__(self) -> None:
        self._count = 0
        self._none = asyncio.Event()
        self._none.set()

    def __enter__(self) -> None:
        self._count += 1
        self._none.clear()

    def __exit__(self, *exc: object) -> None:
        self._count -= 1
        if not self._count:
            self._none.set()

    async def wait(self, within: float) -> None:
        """Waits until no call is under way, ``within`` seconds at most (a stalled index or
        broker holds a call for its own bounds)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._none.wait()


class _Counting(Protocol):
    _calls: CallsInFlight


S = TypeVar("S", bound=_Counting)


def counted(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """Counts each call of ``method`` in its store's :class:`CallsInFlight`."""

    @functools.wraps(method)
    async def call(store: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        with store._calls:
            return await method(store, *args, **kwargs)

    return call
