"""The producer and device loops every trial runs, in a child process or in the harness itself."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable
from typing import Protocol, TextIO

from amqp_queue import OutcomeRejected, RabbitMQConfig, RabbitMQStore, ReceivedCommand
from amqp_queue.state import Store
from tests.faults.ledger import Delivery, Op, to_line

READY = '{"record": "Ready"}'


def trial_config(exchange: str) -> RabbitMQConfig:
    """Production defaults, but a short publish timeout so outages fail over fast."""
    return RabbitMQConfig(exchange=exchange, publish_timeout=2.0, relay_interval=2.0)


class Recorder(Protocol):
    def op_started(self, op: Op) -> None: ...

    def op_finished(self, op: Op) -> None: ...

    def delivered(self, delivery: Delivery) -> None: ...


class MemoryRecorder:
    """Keeps the records of a trial that runs in the harness's own process."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.deliveries: list[Delivery] = []

    def op_started(self, op: Op) -> None:
        self.ops.append(op)

    def op_finished(self, op: Op) -> None:
        pass  # the Op object in ``ops`` is the one that finished

    def delivered(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)


class LineRecorder:
    """Writes each record of a child process as a JSON line, flushed at once: a SIGKILL may
    come at any moment, and what was written before it must reach the harness."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self._out = out

    def _write(self, line: str) -> None:
        self._out.write(line + "\n")
        self._out.flush()

    def ready(self) -> None:
        self._write(READY)

    def op_started(self, op: Op) -> None:
        self._write(to_line(op))

    def op_finished(self, op: Op) -> None:
        self._write(to_line(op))

    def delivered(self, delivery: Delivery) -> None:
        self._write(to_line(delivery))


class Producer:
    """A random mix of operations for one device, one at a time: plain, latest-wins and
    confirmation commands, confirms of some of those, and cancels of some plain ones.

    ``name`` tells producers of one device apart (their payloads, unique per command, carry
    it); two producers of one device must not both make latest-wins or confirmation
    commands, which the judge replays as one sequence per device.
    """

    def __init__(
        self,
        store: Store,
        device: str,
        rng: random.Random,
        recorder: Recorder,
        *,
        pause: float = 0.0,
        name: str = "",
    ) -> None:
        self._store = store
        self._name = name
        self._device = device
        self._rng = rng
        self._recorder = recorder
        self._pause = pause
        self._count = 0
        self._plain: list[Op] = []
        self._unconfirmed: Op | None = None

    async def run(self, stop: asyncio.Event | None = None, steps: int | None = None) -> None:
        done = 0
        while not (stop is not None and stop.is_set()) and (steps is None or done < steps):
            await self.step()
            done += 1
            await asyncio.sleep(self._rng.uniform(0, self._pause))

    async def step(self) -> None:
        roll = self._rng.random()
        if roll < 0.08 and self._plain:
            target = self._plain.pop(self._rng.randrange(len(self._plain)))
            await self._target("cancel", target)
        elif roll < 0.2 and self._unconfirmed is not None:
            target, self._unconfirmed = self._unconfirmed, None
            await self._target("confirm", target)
        elif roll < 0.5:
            await self._enqueue("update", "setpoint")
        elif roll < 0.65:
            op = await self._enqueue("confirmable", "unlock")
            self._unconfirmed = op if op.command_id else self._unconfirmed
        else:
            op = await self._enqueue("plain", None)
            if op.command_id:
                self._plain.append(op)

    async def _enqueue(self, kind: str, command_type: str | None) -> Op:
        self._count += 1
        key = f"{self._device}/{self._name}{self._count}"
        payload = key.encode()
        op = Op(self._device, kind, key, command_type, time.monotonic(), producer=self._name)
        if kind == "plain":
            call = self._store.enqueue(self._device, payload, 600)
        elif kind == "update":
            call = self._store.enqueue_or_update(self._device, "setpoint", payload, 600)
        else:
            call = self._store.enqueue_with_confirmation(self._device, "unlock", payload, 600)
        return await self._call(op, call)

    async def _target(self, kind: str, target: Op) -> Op:
        assert target.command_id is not None
        op = Op(
            self._device,
            kind,
            target.key,
            target.command_type,
            time.monotonic(),
            producer=self._name,
        )
        if kind == "cancel":
            call = self._store.cancel_command(target.command_id)
        else:
            call = self._store.confirm_command(target.command_id)
        return await self._call(op, call)

    async def _call(self, op: Op, call: Awaitable[str | None]) -> Op:
        self._recorder.op_started(op)
        try:
            result = await call
        except Exception as exc:  # recorded and judged: a storm must go on
            op.error = type(exc).__name__
        else:
            op.command_id = result if result is not None else op.command_id
        op.returned = time.monotonic()
        self._recorder.op_finished(op)
        return op


async def consume_forever(
    store: RabbitMQStore,
    device: str,
    recorder: Recorder,
    rng: random.Random,
    *,
    work: float = 0.003,
    reports: float = 0.0,
) -> None:
    """A device on ``consume()``: records each command at the end of its loop body, after
    ``work`` (at most) seconds of handling it, then reports its outcome for a ``reports``
    share of them. Reconnects after a broker failure; runs until cancelled."""
    while True:
        try:
            async with store.consume(device) as stream:
                while True:
                    asked = time.monotonic()
                    command = await anext(stream)
                    handed = time.monotonic()
                    await asyncio.sleep(rng.uniform(0, work))
                    key = command.payload.decode()
                    finished = time.monotonic()
                    delivery = Delivery(device, key, command.id, asked, handed, finished)
                    recorder.delivered(delivery)
                    # Recorded first: an outcome is never for a command the log lacks.
                    if rng.random() < reports:
                        await _report(command, rng)
        except Exception:  # a storm goes on: the device connects again
            await asyncio.sleep(0.2)


async def _report(command: ReceivedCommand, rng: random.Random) -> None:
    """The gateway reports how the command went (the judge checks it took the command)."""
    try:
        if rng.random() < 0.5:
            await command.complete(b"done")
        else:
            await command.fail("the device said no")
    except OutcomeRejected:
        pass  # cancelled or replaced while the device was on it: an answer, not a fault


async def drain_forever(store: RabbitMQStore, device: str, recorder: Recorder) -> None:
    """A device on ``drain_commands()``: records what each drain returned, once it returned."""
    while True:
        asked = time.monotonic()
        records = await store.drain_commands(device)
        handed = time.monotonic()
        for record in records:
            key = record.payload.decode()
            recorder.delivered(Delivery(device, key, record.id, asked, handed, handed))
        if not records:
            await asyncio.sleep(0.05)
