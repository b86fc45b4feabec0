"""Crash trials: a producer or a device process killed with SIGKILL, then a restart.

Every trial runs in its own exchange namespace on a fresh state index (SQLite, PostgreSQL or
Redis); the restart is a new RabbitMQStore on the same state and exchange.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path

from amqp_queue import RabbitMQStore
from amqp_queue.state import CommandStatus, Store
from tests.faults.children import Child
from tests.faults.ledger import ENQUEUES, Delivery, Op, Tally, from_lines, judge, required_keys
from tests.faults.states import fresh_state, rabbitmq_on
from tests.faults.workload import MemoryRecorder, Producer, consume_forever, trial_config
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique

DEVICES = 3


def _devices() -> list[str]:
    return [f"gw-{n}" for n in range(DEVICES)]


async def statuses_of(store: RabbitMQStore, ops: list[Op]) -> dict[str, CommandStatus]:
    """``get_status`` of every command an enqueue returned."""
    ids = [op.command_id for op in ops if op.kind in ENQUEUES and op.command_id is not None]
    return {command_id: await store.get_status(command_id) for command_id in ids}


async def _run_killed(
    child: Child,
    rng: random.Random,
    low: float,
    high: float,
    under_way: Callable[[], bool] = lambda: True,
) -> None:
    """Kills ``child`` ``low`` to ``high`` seconds after it is ready and ``under_way`` says so."""
    try:
        async with asyncio.timeout(60):
            await child.ready()
            while not under_way():  # noqa: ASYNC110 - polling the child's output
                await asyncio.sleep(0.02)
        await asyncio.sleep(rng.uniform(low, high))
        if child.died_by_itself:
            raise RuntimeError(f"the child crashed by itself:\n{child.stderr[-3000:]}")
    finally:
        await child.kill()


def _returned(child: Child) -> bool:
    ops, _ = from_lines(child.lines)
    return any(op.kind in ENQUEUES and op.took_effect for op in ops)


async def producer_kill_trial(rng: random.Random, state_kind: str, directory: Path) -> Tally:
    """A producer is killed mid-storm; after a restart every enqueue that returned is
    delivered once, and per (device, type) only the last accepted payload."""
    exchange = unique("faults.")
    devices = _devices()
    async with fresh_state(state_kind, directory) as spec:
        try:
            seed = str(rng.random())
            args = (AMQP_URL, spec, exchange, seed, *devices)
            child = await Child.start("tests.faults.producer_child", *args)
            # Once an enqueue has returned: on a loaded machine the child's first calls can
            # take longer than the whole window, and a trial with none accepted checks nothing.
            await _run_killed(child, rng, 0.1, 1.2, lambda: _returned(child))
            ops, _ = from_lines(child.lines)
            config = trial_config(exchange)
            async with rabbitmq_on(spec, AMQP_URL, config) as store:
                # The killed producer's unpublished commands are the relay's once they are
                # past its lease (their writer might have been publishing them): then
                # nothing ready is left unpublished.
                await asyncio.sleep(config.relay_lease)
                await store.relay_outbox()
                outbox_left = len(await store.state.unpublished(10_000))
                deliveries = await _drain_until_empty(store, devices)
                await _identify_in_flight(store, devices, ops, deliveries)
                tally = judge(ops, deliveries, await statuses_of(store, ops))
        finally:
            await delete_namespace(exchange, devices)
    tally.outbox_left = outbox_left
    return tally


async def _identify_in_flight(
    store: Store, devices: list[str], ops: list[Op], deliveries: list[Delivery]
) -> None:
    """Gives an enqueue that was in flight at the kill the id it got, if it reached the
    index (delivered, or still pending): payloads are unique, so they name the command."""
    found = {delivery.key: delivery.command_id for delivery in deliveries}
    for device in devices:
        found |= {c.payload.decode(): c.id for c in await store.get_pending(device)}
    for op in ops:
        if op.returned is None and op.kind in ENQUEUES and op.key in found:
            op.command_id = found[op.key]


async def _drain_until_empty(store: RabbitMQStore, devices: list[str]) -> list[Delivery]:
    deliveries: list[Delivery] = []
    empty_rounds = 0
    while empty_rounds < 2:
        got = 0
        for device in devices:
            asked = time.monotonic()
            records = await store.drain_commands(device)
            handed = time.monotonic()
            for record in records:
                key = record.payload.decode()
                deliveries.append(Delivery(device, key, record.id, asked, handed, handed))
                got += 1
        empty_rounds = 0 if got else empty_rounds + 1
    return deliveries


async def consumer_kill_trial(
    rng: random.Random, state_kind: str, directory: Path, *, mode: str = "consume"
) -> Tally:
    """A device process on ``consume()`` (or ``drain``) is killed mid-delivery; a restarted
    device gets everything it had not finished, repeats only of the same ids."""
    exchange = unique("faults.")
    devices = _devices()
    steps = 60 if mode == "consume" else 150
    async with fresh_state(state_kind, directory) as spec:
        try:
            recorder = MemoryRecorder()
            async with rabbitmq_on(spec, AMQP_URL, trial_config(exchange)) as store:
                producers = [
                    Producer(store, device, random.Random(f"{rng.random()}"), recorder)
                    for device in devices
                ]
                await asyncio.gather(*(producer.run(steps=steps) for producer in producers))
            args = (AMQP_URL, spec, exchange, mode, str(rng.random()), *devices)
            child = await Child.start("tests.faults.consumer_child", *args)
            await _run_killed(child, rng, 0.0, 0.5 if mode == "consume" else 0.1)
            _, before = from_lines(child.lines)
            async with rabbitmq_on(spec, AMQP_URL, trial_config(exchange)) as store:
                after = await consume_until_quiet(store, devices, recorder.ops, before)
                statuses = await statuses_of(store, recorder.ops)
        finally:
            await delete_namespace(exchange, devices)
    return judge(recorder.ops, before + after, statuses, drained=mode == "drain")


async def consume_until_quiet(
    store: RabbitMQStore,
    devices: list[str],
    ops: list[Op],
    earlier: list[Delivery],
    *,
    quiet: float = 0.5,
    stall: float = 3.0,
    deadline: float = 30.0,
) -> list[Delivery]:
    """Devices consume until every command they must get has come (counting ``earlier``
    deliveries) and nothing more arrives for ``quiet`` seconds; or until nothing at all
    arrives for ``stall`` seconds (what is missing then is lost); at most ``deadline``."""
    recorder = MemoryRecorder()
    required = required_keys(ops)
    rng = random.Random(0)
    tasks = [
        # Reporting some outcomes too: the judge checks each is for a command a device took.
        asyncio.create_task(consume_forever(store, device, recorder, rng, work=0, reports=0.25))
        for device in devices
    ]
    try:
        give_up = time.monotonic() + deadline
        seen = 0
        last_change = time.monotonic()
        while time.monotonic() < give_up:
            await asyncio.sleep(0.05)
            if len(recorder.deliveries) != seen:
                seen, last_change = len(recorder.deliveries), time.monotonic()
            got = {d.key for d in earlier} | {d.key for d in recorder.deliveries}
            idle = time.monotonic() - last_change
            if (required <= got and idle >= quiet) or idle >= stall:
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return recorder.deliveries
