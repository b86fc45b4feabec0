"""The demo's simulated fleet: devices that sleep and wake, and a producer of commands.

A device sleeps (offline) for a while, wakes, drains everything ready for it, stays online
consuming commands as they arrive, and sleeps again. The producer meanwhile sends a mix of
commands to random devices: long-lived jobs, short-lived blinks that expire while a device
sleeps, bursts of set-points where the latest wins, and unlocks that wait for an operator.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from itertools import count

from amqp_queue.demo.ledger import Issued, Kind, Ledger, Receipt
from amqp_queue.demo.operator import HttpOperator
from amqp_queue.state.model import CommandRecord, PendingCommand
from amqp_queue.store import RabbitMQStore

LONG_TTL = 120.0
"""Seconds a job, set-point or unlock lives: longer than any demo run."""
COMMAND_TYPES = ("setpoint", "unlock")
"""The latest-wins and confirmation commands' types."""
LONGEST_PAYLOAD = 32
"""Bytes a payload may take: a word and a sequence number."""


class Device:
    """One simulated device on its own queue.

    Args:
        name: the device id.
        store: the store it drains and consumes from.
        ledger: where it records what it received.
        rng: its source of sleep and wake times.
        awake: (shortest, longest) seconds online; asleep is twice that.
    """

    def __init__(
        self,
        name: str,
        store: RabbitMQStore,
        ledger: Ledger,
        rng: random.Random,
        awake: tuple[float, float],
    ) -> None:
        self.name = name
        self._store = store
        self._ledger = ledger
        self._rng = rng
        self._awake = awake

    async def live(self, stop: asyncio.Event) -> None:
        """Sleeps and wakes until ``stop`` is set; wakes only between whole phases."""
        while not stop.is_set():
            shortest, longest = self._awake
            try:
                await asyncio.wait_for(stop.wait(), self._rng.uniform(2 * shortest, 2 * longest))
                return
            except TimeoutError:
                pass
            await self.drain()
            await self.consume(self._rng.uniform(shortest, longest))

    async def drain(self) -> None:
        """What a device does on reconnect: takes everything ready, at once."""
        for record in await self._store.drain_commands(self.name):
            self._record(record, "drain")

    async def consume(self, seconds: float) -> None:
        """Stays online for ``seconds``, taking commands as they arrive."""
        async with self._store.consume(self.name) as stream:
            try:
                async with asyncio.timeout(seconds):
                    async for command in stream:
                        self._record(command, "consume")
            except TimeoutError:
                pass

    def _record(self, command: PendingCommand | CommandRecord, via: str) -> None:
        self._ledger.receive(Receipt(self.name, command.id, datetime.now(UTC), via))


class Producer:
    """Sends a random mix of commands to the fleet and records each in the ledger."""

    def __init__(
        self,
        store: RabbitMQStore,
        devices: list[str],
        ledger: Ledger,
        operator: HttpOperator,
        rng: random.Random,
    ) -> None:
        self._store = store
        self._devices = devices
        self._ledger = ledger
        self._operator = operator
        self._rng = rng
        self._seq = count()

    async def run(self, seconds: float, interval: float) -> None:
        """Sends a command (or a burst of set-points) every ``interval`` seconds."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while loop.time() < until:
            await self.send_one()
            await asyncio.sleep(interval)

    async def send_one(self) -> None:
        device = self._rng.choice(self._devices)
        roll = self._rng.random()
        asked_at = datetime.now(UTC)
        if roll < 0.35:
            seq = next(self._seq)
            command_id = await self._store.enqueue(device, f"job {seq}".encode(), LONG_TTL)
            self._issue(Issued(command_id, device, Kind.JOB, seq, asked_at, datetime.now(UTC)))
        elif roll < 0.60:
            for _ in range(self._rng.randint(1, 3)):
                seq = next(self._seq)
                asked_at = datetime.now(UTC)
                command_id = await self._store.enqueue_or_update(
                    device, COMMAND_TYPES[0], f"setpoint {seq}".encode(), LONG_TTL
                )
                self._issue(
                    Issued(command_id, device, Kind.SETPOINT, seq, asked_at, datetime.now(UTC))
                )
        elif roll < 0.85:
            seq = next(self._seq)
            ttl = self._rng.uniform(0.2, 0.8)
            command_id = await self._store.enqueue(device, f"blink {seq}".encode(), ttl)
            self._issue(Issued(command_id, device, Kind.BLINK, seq, asked_at, datetime.now(UTC)))
        else:
            seq = next(self._seq)
            command_id = await self._store.enqueue_with_confirmation(
                device, COMMAND_TYPES[1], f"unlock {seq}".encode(), LONG_TTL
            )
            self._issue(Issued(command_id, device, Kind.UNLOCK, seq, asked_at, datetime.now(UTC)))
            self._operator.watch(device)

    def _issue(self, command: Issued) -> None:
        self._ledger.issue(command)
