"""A short, real run of the command queue on the embedded SQLite default.

Enqueues, replaces, confirms and drains commands for one device and prints what happened.
Run with ``python -m amqp_queue.demo [--state-url URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from state import SqlStore


async def run(state_url: str) -> None:
    def say(line: str) -> None:
        sys.stdout.write(line + "\n")

    async with await SqlStore.connect(state_url) as store:
        device = "thermostat-42"
        say(f"state index: {state_url}")
        await store.enqueue(device, b"reboot", 300)
        say("enqueued    reboot (plain, ttl 300s)")
        first = await store.enqueue_or_update(device, "setpoint", b"20.0", 300)
        second = await store.enqueue_or_update(device, "setpoint", b"21.5", 300)
        say(f"replaced    setpoint 20.0 by 21.5 -> old is {await store.get_status(first)}")
        unlock = await store.enqueue_with_confirmation(device, "unlock", b"door-1", 300)
        say(f"awaiting    unlock -> {await store.get_status(unlock)}")
        say(f"drain       before confirm -> {await store.drain_pending(device)}")
        await store.enqueue_or_update(device, "setpoint", b"22.0", 300)
        await store.confirm_command(unlock)
        say("confirmed   unlock")
        say(f"drain       after confirm -> {await store.drain_pending(device)}")
        say(f"status      setpoint 21.5 -> {await store.get_status(second)}")
        say(f"status      unlock -> {await store.get_status(unlock)}")
        say(f"pending     now -> {await store.get_pending(device)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-url", help="SQLAlchemy URL of the state index")
    args = parser.parse_args(argv)
    if args.state_url:
        asyncio.run(run(args.state_url))
        return
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(run(f"sqlite+aiosqlite:///{Path(directory) / 'commands.db'}"))


if __name__ == "__main__":
    main()
