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
# Seconds without progress after which the close stops waiting: what is held back waits
# behind a command its writer will not publish (it died), and waiting longer gains nothing.
_HELD_WAIT = 1.0


async def publish_owed(relay: OutboxRelay, within: float) -> None:
    """Publishes what ``relay`` owes, trying for ``within`` seconds at most, and for
    :data:`_HELD_WAIT` seconds without progress; what is left (the broker or the index
    failing, or another process's command still ahead of it unpublished) is logged and left
    to the relay lease's sweep."""
    if not relay.owes:
        return
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            owed, since = relay.owes, loop.time()
            while True:
                await relay.flush()
                if not relay.owes:
                    return
                if relay.owes < owed:
                    owed, since = relay.owes, loop.time()
                elif loop.time() - since > _HELD_WAIT:
                    raise TimeoutError
                await asyncio.sleep(_HELD_RETRY)
    except (TimeoutError, BrokerError, StateError) as exc:
        reason = str(exc) or f"still waiting behind other commands after {within:g} s"
        logger.warning(
            "closing with %d commands not published (%s): the relay of another process "
            "publishes them after relay_after",
            relay.owes,
            reason,
        )
