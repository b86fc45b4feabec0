"""What a closing store still owes the broker goes out before the store does.

A command owed to the relay (held back behind another process's commands that were still in
flight when this store started, a fan-out published by the relay, a publish that failed) is
published only by this process's relay, or after ``relay_after`` by whichever process holds
the relay lease. A short-lived store (a command-line ``enqueue`` or ``confirm`` beside a busy
gateway) closed with such a command owed left it to that sweep: half a minute and more, past
the expiry of a short-lived command, while its device was online.
"""

from __future__ import annotations

import asyncio
import logging

from amqp_queue.errors import BrokerError
from amqp_queue.outbox import OutboxRelay
from amqp_queue.state.errors import StateError

logger = logging.getLogger("amqp_queue.outbox")

# Seconds between tries while what is owed waits behind another process's publishes.
_HELD_RETRY = 0.05


async def publish_owed(relay: OutboxRelay, within: float) -> None:
    """Publishes what ``relay`` owes, trying for ``within`` seconds at most; what is left
    (the broker or the index failing, or another process's command still ahead of it
    unpublished) is logged and left to the relay lease's sweep."""
    if not relay.owes:
        return
    try:
        async with asyncio.timeout(within):
            while True:
                await relay.flush()
                if not relay.owes:
                    return
                await asyncio.sleep(_HELD_RETRY)
    except (TimeoutError, BrokerError, StateError) as exc:
        logger.warning(
            "closing with %d commands not published (%s): the relay of another process "
            "publishes them after relay_after",
            relay.owes,
            exc or "still waiting behind another process's commands",
        )
