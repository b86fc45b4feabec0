"""Sidecar loss: three store processes on one PostgreSQL index and one broker, one killed.

Three sidecar processes (tests/faults/sidecar_child.py) share a PostgreSQL schema and an
exchange. Each enqueues for two devices of its own and consumes for the two devices the next
one enqueues for, so every command crosses processes: written by one, relayed by any, handed
out by another. Mid-storm the victim's broker connection is cut (its enqueues return with
their commands left in the outbox, as in any broker outage) and the victim is killed with
SIGKILL while cut: its unpublished commands can only reach their devices through the
survivors' outbox relays, once ``relay_after`` has passed. A survivor takes over the victim's
devices. A tap on the exchange counts every publish (tests/faults/tap.py): none twice.

Judged: nothing accepted lost, nothing stale, statuses true, the outbox drained, no command
published twice, order kept per hand-out stream; repeats (same id) only on the devices whose
consumer was the victim (at-least-once after a kill), elsewhere as failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from amqp_queue.state import CommandStatus, IndexedStore
from tests.faults.children import Child
from tests.faults.crash import _identify_in_flight
from tests.faults.ledger import (
    ENQUEUES,
    Delivery,
    Op,
    Tally,
    from_lines,
    judge,
    out_of_order,
    required_keys,
)
from tests.faults.states import fresh_state, open_state_spec
from tests.faults.tap import PublishTap
from tests.faults.workload import trial_config
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique
from tests.tcp_proxy import BROKER_PORT, TCPProxy

SIDECARS = 3


def _records(children: list[Child]) -> tuple[list[Op], list[Delivery]]:
    ops: list[Op] = []
    deliveries: list[Delivery] = []
    for child in children:
        more_ops, more_deliveries = from_lines(child.lines)
        ops += more_ops
        deliveries += more_deliveries
    return ops, deliveries


async def _until(condition: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if await condition():
            return True
        await asyncio.sleep(0.2)
    return False


async def sidecar_loss_trial(
    rng: random.Random,
    state_kind: str,
    directory: Path,
    *,
    seconds: float = 6.0,
    sidecars: int = SIDECARS,
) -> Tally:
    """One storm of ``seconds`` over ``sidecars`` processes, one cut off and killed; judged."""
    exchange = unique("faults.")
    devices = [f"gw-{n}" for n in range(2 * sidecars)]
    produced = [devices[2 * i : 2 * i + 2] for i in range(sidecars)]
    consumed = [produced[(i + 1) % sidecars] for i in range(sidecars)]
    victim = rng.randrange(sidecars)
    heir = (victim + 1) % sidecars
    config = trial_config(exchange)
    children: list[Child] = []
    async with (
        fresh_state(state_kind, directory) as spec,
        TCPProxy(BROKER_PORT) as proxy,
        PublishTap(exchange, devices) as tap,
    ):
        index = await open_state_spec(spec)
        try:
            seed = str(rng.random())
            for number in range(sidecars):
                url = proxy.amqp_url if number == victim else AMQP_URL
                args = (
                    f"{url}?reconnect_interval=0.2",
                    spec,
                    exchange,
                    seed,
                    f"s{number}",
                    ",".join(produced[number]),
                    ",".join(consumed[number]),
                )
                children.append(await Child.start("tests.faults.sidecar_child", *args, stdin=True))
            async with asyncio.timeout(60):
                await asyncio.gather(*(child.ready() for child in children))
            began = time.monotonic()
            await asyncio.sleep(rng.uniform(0.5, seconds / 3))
            # Cut off, the victim's enqueues return after publish_timeout with their commands
            # left to the relay; killed while cut, it never relays them itself.
            await proxy.cut()
            await asyncio.sleep(config.publish_timeout + rng.uniform(0.5, 2.0))
            await children[victim].kill()
            orphans = len(await index.unpublished(10_000))
            await children[heir].send(f"consume {','.join(consumed[victim])}")
            await asyncio.sleep(max(1.0, began + seconds - time.monotonic()))
            survivors = [child for n, child in enumerate(children) if n != victim]
            for child in survivors:
                await child.send("stop")

            seen = [0, time.monotonic()]  # deliveries so far, when that count last changed

            async def settled() -> bool:
                if await index.unpublished(10_000):
                    return False
                ops, deliveries = _records(children)
                if len(deliveries) != seen[0]:
                    seen[:] = [len(deliveries), time.monotonic()]
                # Or quiet for 3 s: the victim's call in flight at the kill may have replaced
                # a command this check (which takes it not to have) still waits for.
                quiet = time.monotonic() - seen[1] >= 3.0
                return quiet or required_keys(ops) <= {d.key for d in deliveries}

            await _until(settled, 45)
            await asyncio.sleep(0.5)  # late repeats, if any, are counted too
            for child in survivors:
                await child.send("quit")
            async with asyncio.timeout(30):
                for child in survivors:
                    await child.wait()
            outbox_left = len(await index.unpublished(10_000))
            await tap.settle()
            ops, deliveries = _records(children)
            await _identify_in_flight(index, devices, ops, deliveries)
            statuses = await _statuses(index, ops)
        finally:
            for child in children:
                await child.kill()
            await index.close()
            with contextlib.suppress(Exception):
                await delete_namespace(exchange, devices)
    return _judge(ops, deliveries, statuses, set(consumed[victim]), orphans, outbox_left, tap)


async def _statuses(index: IndexedStore, ops: list[Op]) -> dict[str, CommandStatus]:
    ids = [op.command_id for op in ops if op.kind in ENQUEUES and op.command_id is not None]
    return {command_id: await index.get_status(command_id) for command_id in ids}


def _judge(
    ops: list[Op],
    deliveries: list[Delivery],
    statuses: dict[str, CommandStatus],
    victims_devices: set[str],
    orphans: int,
    outbox_left: int,
    tap: PublishTap,
) -> Tally:
    """Repeats on the devices the victim consumed are at-least-once after its kill; any
    other repeat is a failure (counted with ``unclear_errors``, since no fault explains it)."""
    tally = judge(ops, deliveries, statuses)
    others = judge(
        [op for op in ops if op.device not in victims_devices],
        [d for d in deliveries if d.device not in victims_devices],
        statuses,
    )
    tally.unclear_errors += others.duplicates
    tally.outbox_left = outbox_left
    tally.dup_publishes = tap.duplicates
    tally.out_of_order = out_of_order(ops, deliveries)
    tally.orphans = orphans
    _show_copies(ops, tap)
    return tally


def _show_copies(ops: list[Op], tap: PublishTap) -> None:
    """Prints (captured, shown with a failure) whose commands were published twice and when
    their calls ran: the victim's, cut off mid-publish, or a live writer's slower than
    ``relay_after`` (once, under three times the usual load, in the test command)."""
    calls = {op.command_id: op for op in ops if op.command_id is not None}
    for command_id, count in tap.counts.items():
        if count > 1:
            op = calls.get(command_id)
            writer = "unknown" if op is None else f"{op.producer} ({op.device})"
            took = "?" if op is None or op.returned is None else f"{op.returned - op.started:.2f}"
            print(f"published {count} times: {command_id}, written by {writer}, call {took} s")
