"""The second process of the restart test: reopens the store on the same state file.

Prints one JSON object: the pending confirmations it found, the id of its replacement, and
the payloads its two drains returned.
"""

from __future__ import annotations

import asyncio
import json
import sys

from amqp_queue import RabbitMQConfig, RabbitMQStore


async def main(amqp_url: str, state_url: str, exchange: str) -> None:
    config = RabbitMQConfig(exchange=exchange)
    async with await RabbitMQStore.connect(amqp_url, state_url=state_url, config=config) as store:
        confirmations = [command.id for command in await store.get_pending_confirmations("dev-1")]
        replacement = await store.enqueue_or_update("dev-1", "setpoint", b"21", 600)
        for command_id in confirmations:
            await store.confirm_command(command_id)
        first = await store.drain_pending("dev-1")
        second = await store.drain_pending("dev-1")
    result = {
        "confirmations": confirmations,
        "replacement": replacement,
        "first_drain": [payload.decode() for payload in first],
        "second_drain": [payload.decode() for payload in second],
    }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
