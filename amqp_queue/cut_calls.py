"""What a call its caller cut short waits for before it raises the cancellation.

An enqueue cancelled once a transaction took its write cannot take the write back. It raises
only once the write landed (or failed) and, if it landed, once its commands were published:
a call begun after the cut one raised, on any store, is then written and published after it,
as after a call that returned. Both waits are bounded, so a stalled index or broker does not
hold the cancellation for ever; a further cancellation ends them (not the write or publish).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any

from amqp_queue.state.errors import StateError

logger = logging.getLogger("amqp_queue.publish_path")


def landed(written: asyncio.Future[Any]) -> bool:
    """Whether the write ended, and did not fail."""
    return written.done() and not written.cancelled() and written.exception() is None


async def until_landed(written: asyncio.Future[Any], within: float) -> None:
    """Waits until ``written`` landed or failed (``within`` seconds at most), so an older
    replacement never lands over a newer one begun after the cut call raised."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait([written], timeout=within)


async def despite_the_cut(waiting: Awaitable[object]) -> None:
    """Awaits ``waiting`` (the cut call's commands published, bounded by ``publish_timeout``:
    see :meth:`~amqp_queue.outbox.OutboxRelay.published`) though the caller was cancelled.

    The relay the commands were left to may take a pass to publish them, while the next
    call to the device on another store publishes directly: it went first (the twenty-second
    session's probe; tests/test_cut_enqueue_order.py)."""
    running = asyncio.ensure_future(waiting)
    try:
        await asyncio.wait([running])
    except asyncio.CancelledError:
        running.cancel()


def unread_failure(written: asyncio.Future[Any]) -> None:
    """Logs the failure of a write whose caller was cancelled (it had nobody to raise to):
    a refusal (the command no longer open) at debug, an index failure as a warning."""
    if written.cancelled() or (failure := written.exception()) is None:
        return
    level = logging.WARNING if isinstance(failure, StateError) else logging.DEBUG
    logger.log(level, "a write went on after its caller was cancelled and failed: %r", failure)
