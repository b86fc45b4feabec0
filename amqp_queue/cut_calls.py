"""What a call its caller cut short waits for before it raises the cancellation.

An enqueue cancelled once a transaction took its write cannot take the write back. It raises
only once the write landed (or failed) and, if it landed, once its commands were published:
a call begun after the cut one raised, on any store, is then written and published after it,
as after a call that returned. Both waits are bounded, so a stalled index or broker does not
hold the cancellation for ever; a further cancellation ends them (not the write or publish).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from amqp_queue.state.errors import StateError

logger = logging.getLogger("amqp_queue.cut_calls")


def landed(written: asyncio.Future[Any]) -> bool:
    """Whether the write ended, and did not fail."""
    return written.done() and not written.cancelled() and written.exception() is None


async def until_landed(written: asyncio.Future[Any], within: float) -> bool:
    """Waits until ``written`` landed or failed (``within`` seconds at most), so an older
    replacement never lands over a newer one begun after the cut call raised. False if the
    caller was cancelled again meanwhile: it then raises at once, waiting for nothing more."""
    try:
        await asyncio.wait([written], timeout=within)
    except asyncio.CancelledError:
        return False
    return True


async def despite_the_cut(waiting: Awaitable[object], within: float) -> None:
    """Awaits ``waiting`` (the cut call's commands published) though the caller was
    cancelled, ``within`` seconds at most; a further cancellation ends the wait.

    The relay the commands were left to may take a pass to publish them, while the next
    call to the device on another store publishes directly: it went first
    (tests/test_cut_enqueue_order.py)."""
    running = asyncio.ensure_future(waiting)
    # Its failure is nobody's to hear: not "never retrieved".
    running.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        await asyncio.wait([running], timeout=within)
    except asyncio.CancelledError:
        pass
    finally:
        running.cancel()  # a wait only: the publish itself goes on


def unread_failure(written: asyncio.Future[Any]) -> None:
    """Logs the failure of a write whose caller was cancelled (it had nobody to raise to):
    a refusal (the command no longer open) at debug, an index failure as a warning."""
    if written.cancelled() or (failure := written.exception()) is None:
        return
    level = logging.WARNING if isinstance(failure, StateError) else logging.DEBUG
    logger.log(level, "a write went on after its caller was cancelled and failed: %r", failure)
