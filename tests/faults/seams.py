"""Seam trials: no fault injected, only the library's moving parts meeting each other.

*Busy gateways*: several producer stores enqueue (plain, latest-wins and confirmation
commands, confirms and cancels; plain ones with a short time to live among them) to a handful
of devices while gateway stores take the same devices' commands at the same time, by
``consume()`` streams and by repeated drains; one more store runs ``relay_outbox()`` in a loop
and short-lived stores open and close throughout (as command-line calls do: an enqueue, a
drain, a listing). Every store has its own broker connection and its own handle on the one
state index, as separate processes would.

*Cancelled enqueues*: producers enqueue numbered plain commands per device, one call at a
time, and cancel many of the calls at a random moment (``asyncio.timeout`` or
``Task.cancel``). Whatever reached the index must then be delivered once, in order, within a
few seconds: the relay's periodic pass is set a minute apart, so a command left to it shows
up as late (it is brought forward at the end, so the command is not counted as lost).

Without a broker or network fault the contract leaves no room: nothing lost, no command handed
out twice, none out of order or stale, each published exactly once (docs/design.md, "RabbitMQ
delivery"). Publishes are counted on the broker by a tap queue (:mod:`tests.faults.tap`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqp_queue import RabbitMQConfig, RabbitMQStore
from tests.faults.crash import statuses_of
from tests.faults.ledger import (
    CUT_SHORT,
    Delivery,
    Op,
    Tally,
    judge,
    late_hand_outs,
    out_of_order,
    required_keys,
)
from tests.faults.states import fresh_state, rabbitmq_on
from tests.faults.tap import PublishTap
from tests.faults.workload import MemoryRecorder, Producer
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique

logger = logging.getLogger("tests.faults.seams")

LONG_TTL = 600.0
PRODUCER_STORES = 3
GATEWAY_STORES = 3

WITHIN = 2.0
"""Seconds within which a command must reach a device that is waiting on ``consume()``."""

SLOW_CALL = 2.0
"""Seconds after which a short-lived store's call (open, one call, close) counts as slow:
opening a store runs an outbox pass, which must not wait for the producers to stop."""


@dataclass(slots=True)
class _Run:
    """What a trial records: the calls, the hand-outs, and failed calls of its own loops."""

    recorder: MemoryRecorder = field(default_factory=MemoryRecorder)
    errors: int = 0
    slow_calls: int = 0

    def failed(self, what: str, exc: Exception) -> None:
        """Counts a failed call of a loop, and logs it (pytest shows it with a failure)."""
        self.errors += 1
        logger.warning("%s failed: %r", what, exc)


# -- the loops ----------------------------------------------------------------------------


async def _enqueue_plain(
    run: _Run,
    store: RabbitMQStore,
    device: str,
    producer: str,
    number: int,
    ttl: float | None = None,
) -> Op:
    key = f"{device}/{producer}{number}"
    op = Op(device, "plain", key, None, time.monotonic(), producer=producer, ttl=ttl)
    run.recorder.op_started(op)
    try:
        op.command_id = await store.enqueue(device, key.encode(), LONG_TTL if ttl is None else ttl)
    except Exception as exc:  # recorded and judged
        op.error = type(exc).__name__
    op.returned = time.monotonic()
    return op


async def _plain_sequence(
    run: _Run,
    store: RabbitMQStore,
    device: str,
    rng: random.Random,
    stop: asyncio.Event,
    *,
    name: str = "s",
    short_ttl_share: float = 0.2,
) -> None:
    """Plain commands for one device, one at a time; some live only a fraction of a second."""
    number = 0
    while not stop.is_set():
        number += 1
        ttl = rng.uniform(0.02, 0.5) if rng.random() < short_ttl_share else None
        await _enqueue_plain(run, store, device, name, number, ttl)
        await asyncio.sleep(rng.uniform(0, 0.01))


async def _consume(
    run: _Run,
    store: RabbitMQStore,
    device: str,
    stream: str,
    rng: random.Random,
    *,
    work: float = 0.003,
) -> None:
    """A device on ``consume()``, recording each command at the end of its loop body; a new
    stream (``stream#2``, ...) after a failure. Runs until cancelled."""
    attempt = 0
    while True:
        attempt += 1
        label = f"{stream}#{attempt}"
        try:
            async with store.consume(device) as commands:
                while True:
                    asked = time.monotonic()
                    command = await anext(commands)
                    handed = time.monotonic()
                    await asyncio.sleep(rng.uniform(0, work))
                    key = command.payload.decode()
                    finished = time.monotonic()
                    delivery = Delivery(device, key, command.id, asked, handed, finished, label)
                    run.recorder.delivered(delivery)
        except Exception as exc:  # counted; the device connects again
            run.failed("consume", exc)
            await asyncio.sleep(0.2)


async def _drain_once(
    run: _Run, store: RabbitMQStore, device: str, stream: str, *, payloads_only: bool = False
) -> int:
    """One drain (``drain_pending`` with ``payloads_only``, else ``drain_commands``); returns
    how many commands it handed out. A ``drain_pending`` hand-out gets its id later, from the
    enqueue of its payload."""
    asked = time.monotonic()
    try:
        if payloads_only:
            got = [(payload, "") for payload in await store.drain_pending(device)]
        else:
            got = [(record.payload, record.id) for record in await store.drain_commands(device)]
    except Exception as exc:
        run.failed("drain", exc)
        return 0
    handed = time.monotonic()
    for payload, command_id in got:
        delivery = Delivery(device, payload.decode(), command_id, asked, handed, handed, stream)
        run.recorder.delivered(delivery)
    return len(got)


async def _drains(
    run: _Run,
    store: RabbitMQStore,
    device: str,
    stream: str,
    rng: random.Random,
    stop: asyncio.Event,
) -> None:
    """A gateway draining one device again and again until ``stop`` (never cancelled: a drain
    cancelled after its claim would lose what it claimed)."""
    calls = 0
    while not stop.is_set():
        calls += 1
        await _drain_once(run, store, device, f"{stream}#{calls}", payloads_only=rng.random() < 0.3)
        await asyncio.sleep(rng.uniform(0, 0.03))


async def _relay_calls(
    run: _Run, store: RabbitMQStore, rng: random.Random, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        try:
            await store.relay_outbox()
        except Exception as exc:
            run.failed("relay", exc)
        await asyncio.sleep(rng.uniform(0, 0.02))


async def _short_lived_stores(
    run: _Run,
    spec: str,
    config: RabbitMQConfig,
    devices: list[str],
    rng: random.Random,
    stop: asyncio.Event,
) -> None:
    """A store opened for one call and closed again, as ``amqp-queue`` command-line calls do:
    an enqueue, a drain, or a listing with a status. One at a time, so its enqueues to a
    device are a sequence of their own ("cli")."""
    calls = 0
    while not stop.is_set():
        calls += 1
        device = rng.choice(devices)
        roll = rng.random()
        started = time.monotonic()
        try:
            async with rabbitmq_on(spec, AMQP_URL, config) as store:
                if roll < 0.5:
                    await _enqueue_plain(run, store, device, "cli", calls)
                elif roll < 0.75:
                    await _drain_once(run, store, device, f"cli#{calls}")
                else:
                    pending = await store.get_pending(device)
                    if pending:
                        await store.get_status(rng.choice(pending).id)
        except Exception as exc:
            run.failed("short-lived store", exc)
        run.slow_calls += time.monotonic() - started > SLOW_CALL
        await asyncio.sleep(rng.uniform(0, 0.05))


# -- bounded waiting ----------------------------------------------------------------------


def _spawn(
    tasks: list[asyncio.Task[None]], coroutine: Coroutine[Any, Any, None]
) -> asyncio.Task[None]:
    task = asyncio.create_task(coroutine)
    tasks.append(task)
    return task


async def _finish(run: _Run, tasks: Sequence[asyncio.Task[None]], within: float) -> None:
    """Waits up to ``within`` seconds for ``tasks`` to end by themselves, then cancels the
    rest (each a hung call, counted as an error); re-raises a harness bug."""
    if not tasks:
        return
    _, hung = await asyncio.wait(tasks, timeout=within)
    run.errors += len(hung)
    await _cancel(hung)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise RuntimeError("a loop of the trial failed") from task.exception()


async def _cancel(tasks: Sequence[asyncio.Task[None]] | set[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=10)


async def _until(condition: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if await condition():
            return True
        await asyncio.sleep(0.05)
    return False


async def _until_quiet(
    run: _Run,
    done: Callable[[], Awaitable[bool]],
    *,
    quiet: float = 0.5,
    stall: float = 2.5,
    deadline: float = 20.0,
) -> None:
    """Waits until ``done()`` and no hand-out for ``quiet`` seconds (late repeats counted
    too), or no hand-out at all for ``stall`` seconds, or ``deadline``."""
    give_up = time.monotonic() + deadline
    seen, last_change = len(run.recorder.deliveries), time.monotonic()
    while time.monotonic() < give_up:
        await asyncio.sleep(0.05)
        if len(run.recorder.deliveries) != seen:
            seen, last_change = len(run.recorder.deliveries), time.monotonic()
        idle = time.monotonic() - last_change
        if idle >= stall or (idle >= quiet and await done()):
            return


async def _drain_all(run: _Run, store: RabbitMQStore, devices: list[str], stream: str) -> None:
    """Drains every device until two rounds in a row find nothing (at most 20 rounds)."""
    empty = 0
    for round_ in range(20):
        got = 0
        for device in devices:
            got += await _drain_once(run, store, device, f"{stream}#{round_}")
        empty = 0 if got else empty + 1
        if empty == 2:
            return


def _name_drain_pending_ids(run: _Run) -> None:
    """``drain_pending`` returns payloads only: their ids are those their enqueue returned."""
    ids = {op.key: op.command_id for op in run.recorder.ops if op.command_id is not None}
    for delivery in run.recorder.deliveries:
        if not delivery.command_id:
            delivery.command_id = ids.get(delivery.key) or "?"


# -- busy gateways ------------------------------------------------------------------------


async def busy_gateways_trial(
    rng: random.Random,
    state_kind: str,
    directory: Path,
    *,
    seconds: float = 3.0,
    devices: int = 4,
) -> Tally:
    """Producers and gateways on separate stores at full tilt for ``seconds``; returns the
    judged tally, with ``out_of_order`` per hand-out stream and ``dup_publishes``."""
    exchange = unique("faults.")
    names = [f"gw-{n}" for n in range(devices)]
    # No fault is injected here: the production publish timeout, not the outage trials' 2 s,
    # which a busy CI machine's broker overran opening drain channels (7 drains failed once).
    config = RabbitMQConfig(exchange=exchange, relay_interval=2.0)
    run = _Run()
    async with fresh_state(state_kind, directory) as spec:
        try:
            async with AsyncExitStack() as stack:
                tap = await stack.enter_async_context(PublishTap(exchange, names))

                async def store() -> RabbitMQStore:
                    return await stack.enter_async_context(rabbitmq_on(spec, AMQP_URL, config))

                producers = [await store() for _ in range(PRODUCER_STORES)]
                gateways = [await store() for _ in range(GATEWAY_STORES)]
                relay = await store()
                tally = await _busy(
                    run, spec, config, names, producers, gateways, relay, tap, rng, seconds
                )
        finally:
            await delete_namespace(exchange, names)
    return tally


async def _busy(
    run: _Run,
    spec: str,
    config: RabbitMQConfig,
    devices: list[str],
    producers: list[RabbitMQStore],
    gateways: list[RabbitMQStore],
    relay: RabbitMQStore,
    tap: PublishTap,
    rng: random.Random,
    seconds: float,
) -> Tally:
    def seeded() -> random.Random:
        return random.Random(rng.random())

    stop_producing, stop_draining = asyncio.Event(), asyncio.Event()
    producing: list[asyncio.Task[None]] = []
    draining: list[asyncio.Task[None]] = []
    consuming: list[asyncio.Task[None]] = []
    try:
        for n, device in enumerate(devices):
            # Per device a consume() stream on one gateway and drain loops on the two others.
            gateway = gateways[n % len(gateways)]
            _spawn(consuming, _consume(run, gateway, device, f"consume-{device}", seeded()))
            for k in (1, 2):
                gateway = gateways[(n + k) % len(gateways)]
                stream = f"drain{k}-{device}"
                _spawn(draining, _drains(run, gateway, device, stream, seeded(), stop_draining))
        _spawn(draining, _relay_calls(run, relay, seeded(), stop_draining))
        for n, device in enumerate(devices):
            mixed = Producer(
                producers[n % len(producers)], device, seeded(), run.recorder, pause=0.01, name="m"
            )
            _spawn(producing, mixed.run(stop_producing))
            plain = producers[(n + 1) % len(producers)]
            _spawn(producing, _plain_sequence(run, plain, device, seeded(), stop_producing))
        _spawn(producing, _short_lived_stores(run, spec, config, devices, seeded(), stop_producing))

        await asyncio.sleep(seconds)
        stop_producing.set()
        await _finish(run, producing, 30)
        required = required_keys(run.recorder.ops)

        async def all_arrived() -> bool:
            return required <= {delivery.key for delivery in run.recorder.deliveries}

        await _until_quiet(run, all_arrived)
        stop_draining.set()
        await _finish(run, draining, 30)
    finally:
        stop_producing.set()
        stop_draining.set()
        await _cancel([*producing, *draining, *consuming])
    # What the streams still held went back to the queues; the last gateway call takes it.
    await _drain_all(run, gateways[0], devices, "final")
    await tap.settle()
    _name_drain_pending_ids(run)
    ops, deliveries = run.recorder.ops, run.recorder.deliveries
    tally = judge(ops, deliveries, await statuses_of(gateways[0], ops))
    tally.out_of_order = out_of_order(ops, deliveries)
    tally.dup_publishes = tap.duplicates
    tally.outbox_left = len(await gateways[0].state.unpublished(10_000))
    tally.errors += run.errors
    tally.slow_calls = run.slow_calls
    return tally


# -- cancelled enqueues -------------------------------------------------------------------


async def _cutting_producer(
    run: _Run, store: RabbitMQStore, device: str, rng: random.Random, seconds: float
) -> None:
    """Numbered plain commands for one device, one call at a time for ``seconds``. Seven calls
    in ten get a deadline at a random moment within one and a half times the usual duration of
    a call, kept by ``asyncio.timeout`` or by ``Task.cancel``; those still running then (about
    four in ten of all calls) are cut short."""
    typical = 0.01  # seconds an uncut call takes, as measured (a moving average)
    number = 0
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        number += 1
        key = f"{device}/{number}"
        op = Op(device, "plain", key, None, time.monotonic(), producer="p")
        run.recorder.op_started(op)
        call = store.enqueue(device, key.encode(), LONG_TTL)
        how, cut_at = rng.random(), rng.uniform(0, 1.5 * typical)
        try:
            if how < 0.35:
                async with asyncio.timeout(cut_at):
                    op.command_id = await call
            elif how < 0.7:
                task = asyncio.create_task(call)
                await asyncio.wait({task}, timeout=cut_at)
                task.cancel()
                op.command_id = await task
            else:
                op.command_id = await call
                typical = 0.8 * typical + 0.2 * (time.monotonic() - op.started)
        except (TimeoutError, asyncio.CancelledError):
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the trial itself is being cancelled
            op.error = CUT_SHORT
        except Exception as exc:
            op.error = type(exc).__name__
        op.returned = time.monotonic()
        await asyncio.sleep(rng.uniform(0, 0.003))


async def cancelled_enqueues_trial(
    rng: random.Random,
    state_kind: str,
    directory: Path,
    *,
    seconds: float = 2.0,
    devices: int = 4,
    within: float = WITHIN,
    wait: float = 4.0,
) -> Tally:
    """Enqueues cut short for ``seconds`` on one store, a device per queue on another;
    returns the judged tally: ``late`` counts commands not handed out ``within`` seconds of
    their enqueue, ``out_of_order`` per device, ``cut_short`` the calls cancelled."""
    exchange = unique("faults.")
    names = [f"dev-{n}" for n in range(devices)]
    # The relay's periodic pass a minute apart: a command left to it is late in this trial.
    config = RabbitMQConfig(exchange=exchange, publish_timeout=2.0, relay_interval=60.0)
    run = _Run()
    async with fresh_state(state_kind, directory) as spec:
        try:
            async with (
                PublishTap(exchange, names) as tap,
                rabbitmq_on(spec, AMQP_URL, config) as producer_store,
                rabbitmq_on(spec, AMQP_URL, config) as device_store,
            ):
                tally = await _cancelled(
                    run, names, producer_store, device_store, tap, rng, seconds, within, wait
                )
        finally:
            await delete_namespace(exchange, names)
    return tally


async def _cancelled(
    run: _Run,
    devices: list[str],
    producer_store: RabbitMQStore,
    device_store: RabbitMQStore,
    tap: PublishTap,
    rng: random.Random,
    seconds: float,
    within: float,
    wait: float,
) -> Tally:
    producing: list[asyncio.Task[None]] = []
    consuming: list[asyncio.Task[None]] = []

    async def nothing_pending() -> bool:
        returned = {op.key for op in run.recorder.ops if op.command_id is not None}
        if not returned <= {delivery.key for delivery in run.recorder.deliveries}:
            return False
        for device in devices:
            if await device_store.get_pending(device):
                return False
        return True

    try:
        for device in devices:
            stream = _consume(run, device_store, device, device, random.Random(rng.random()))
            _spawn(consuming, stream)
        for device in devices:
            cutting = _cutting_producer(
                run, producer_store, device, random.Random(rng.random()), seconds
            )
            _spawn(producing, cutting)
        await _finish(run, producing, seconds + 30)
        # The few seconds every command gets; then the relay's periodic pass, brought
        # forward: what only it publishes is handed out late.
        await _until(nothing_pending, wait)
        try:
            async with asyncio.timeout(10):
                await producer_store.relay_outbox()
        except Exception:  # a timeout included
            run.errors += 1
        await _until(nothing_pending, 3.0)
    finally:
        await _cancel([*producing, *consuming])
    await _drain_all(run, device_store, devices, "final")
    await tap.settle()
    ops, deliveries = run.recorder.ops, run.recorder.deliveries
    for delivery in deliveries:
        delivery.stream = delivery.device  # one reader at a time: one stream per device
    # A call cut short may have reached the index: its payload names its command.
    found = {delivery.key: delivery.command_id for delivery in deliveries}
    for device in devices:
        found |= {
            command.payload.decode(): command.id
            for command in await device_store.get_pending(device)
        }
    cut_short = 0
    for op in ops:
        if op.error == CUT_SHORT:
            cut_short += 1
            if op.key in found:
                op.command_id, op.error = found[op.key], None
    tally = judge(ops, deliveries, await statuses_of(device_store, ops))
    tally.cut_short = cut_short
    tally.out_of_order = out_of_order(ops, deliveries)
    tally.late = late_hand_outs(ops, deliveries, within)
    tally.dup_publishes = tap.duplicates
    tally.outbox_left = len(await device_store.state.unpublished(10_000))
    tally.errors += run.errors
    return tally
