"""Fourteenth adversarial round, aimed at the ninth session's changes: channel-open turns
(hundreds of streams and drains opening at once through one store while the broker closes
its connections or its link stalls), a repeated confirm racing a first one whose broker link
is stalled (the caller cancelled, or its store closed, mid-wait), and stores of both queue
types on one index (killed writers' orphans, the mismatched queue deleted mid-run, stores
starting and closing). Public API to act, every index, the real broker. Judged: every call
ends with a result or a ``QueueError`` in a bounded time, nothing lost or handed out twice,
a call that returned before another began handed out first, statuses true, the store works
afterwards, and no store keeps the relay lease from one that can publish."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path

import aio_pika
import pytest

from amqp_queue import (
    BrokerError,
    CommandStatus,
    QueueError,
    QueueMismatch,
    QueueType,
    RabbitMQStore,
)
from tests.faults.broker import close_connections_named
from tests.rabbitmq_support import AMQP_URL, relays_leave
from tests.support import FULL_MATRIX, matrix, seeded, unique
from tests.tcp_proxy import StallProxy
from tests.test_adversarial_ninth import LONG, space_on, take

ALL = ["sqlite", "postgres", "redis"]
DELIVERED = CommandStatus.DELIVERED
BOUND = 30.0  # seconds any one call may take before it counts as hung
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


# -- 1. a storm of channel opens through one store while its broker link fails -------------


@pytest.mark.parametrize(
    ("backend", "fault"),
    matrix(
        [(b, f) for b in ALL for f in ("close", "stall")],
        [("postgres", "stall")],
    ),
)
async def test_a_storm_of_opens_while_the_broker_link_fails(
    backend: str, fault: str, tmp_path: Path
) -> None:
    """One gateway store (publish_timeout 1 s, 40 channels a connection) starts a stream or
    a drain for each of hundreds of devices, each holding one command, all at once, while
    its connections are closed server side (twice) or its link stalls for 2 s. Each call
    must hand out its command or fail with a QueueError within BOUND; afterwards the same
    store drains the rest, every command handed out once and DELIVERED."""
    rnd = seeded()
    n_streams, n_drains = (240, 120) if FULL_MATRIX else (70, 40)
    async with StallProxy(5672, max_connections=64) as proxy, space_on(backend, tmp_path) as sp:
        name = unique("r14storm")
        gateway = await sp.open(
            f"{proxy.amqp_url}?name={name}&reconnect_interval=0.2",
            publish_timeout=1.0,
            channels_per_connection=40,
        )
        producer = await sp.open()
        devices = [sp.device() for _ in range(n_streams + n_drains)]
        await asyncio.gather(*(producer.enqueue(d, d.encode(), LONG) for d in devices))
        got: list[tuple[str, bytes]] = []
        errors: list[BaseException] = []
        hung: list[str] = []
        took: list[float] = []

        async def call(device: str, streaming: bool) -> None:
            began = time.monotonic()
            try:
                async with asyncio.timeout(BOUND):
                    if streaming:
                        async with gateway.consume(device) as commands:
                            async for command in commands:
                                got.append((device, command.payload))
                                break
                    else:
                        got.extend((device, p) for p in await gateway.drain_pending(device))
            except QueueError as exc:
                errors.append(exc)
            except TimeoutError:
                hung.append(device)
            except Exception as exc:  # judged below: not a library error
                errors.append(exc)
            took.append(time.monotonic() - began)

        async def fault_at() -> None:
            await asyncio.sleep(rnd.uniform(0.02, 0.3))
            if fault == "stall":
                proxy.stall()
                await asyncio.sleep(2.0)
                proxy.resume()
                return
            for _ in range(2):
                await asyncio.to_thread(close_connections_named, name)
                await asyncio.sleep(rnd.uniform(0.2, 0.8))

        await asyncio.gather(fault_at(), *(call(d, n < n_streams) for n, d in enumerate(devices)))
        print(f"{len(got)} handed out, {len(errors)} failed, slowest {max(took):.1f} s")
        assert not hung, f"{len(hung)} calls still running after {BOUND} s: {hung[:3]}"
        unclear = [e for e in errors if not isinstance(e, QueueError)]
        assert not unclear, f"errors outside the library's: {unclear[:3]!r}"
        # The store keeps working: its drains take what the storm did not hand out. One may
        # still fail clearly while the pool opens its connections again after the fault (a
        # connection open is bounded by publish_timeout, 1 s here): a caller tries again.
        left = {d for d in devices} - {d for d, _ in got}
        async with asyncio.timeout(BOUND):
            for attempt in range(3):
                drains = [gateway.drain_pending(d) for d in sorted(left)]
                for d, payloads in zip(
                    sorted(left), await asyncio.gather(*drains, return_exceptions=True), strict=True
                ):
                    if isinstance(payloads, BrokerError) and attempt < 2:
                        continue
                    if isinstance(payloads, BaseException):
                        raise payloads
                    got.extend((d, p) for p in payloads)
                    left.discard(d)
                if not left:
                    break
                await asyncio.sleep(0.5)  # the pool reopening its connections
        twice = {k: n for k, n in Counter(got).items() if n > 1}
        assert not twice, f"handed out twice: {list(twice)[:3]}"
        missing = sorted(d for d in devices if (d, d.encode()) not in got)
        assert not missing, f"{len(missing)} commands never handed out: {missing[:3]}"
        assert all(d.encode() == p for d, p in got)
        statuses = [(await producer.get_pending(d)) for d in devices[:20]]
        assert statuses == [[] for _ in statuses]


# -- 2. a repeated confirm racing the first, whose broker link is stalled ------------------


@pytest.mark.parametrize(
    ("backend", "how"),
    matrix(
        [(b, h) for b in ALL for h in ("returns", "cancelled", "closed")],
        [("sqlite", "cancelled")],
    ),
)
async def test_a_repeated_confirm_while_the_first_ones_publish_is_stalled(
    backend: str, how: str, tmp_path: Path
) -> None:
    """Store A confirms a command; its write commits, its publish stalls (A's broker link
    held). Store B confirms it again: it returns (having waited for A's publish, then
    published it itself), or its caller cancels it mid-wait, or B is closed during the
    wait. Then a confirm that returns (B's, or C's) and C's next enqueue to the device: the
    command goes first, each once, and A's stalled confirm ends in a bounded time."""
    rnd = seeded()
    async with StallProxy(5672) as proxy, space_on(backend, tmp_path) as space:
        a = await space.open(
            f"{proxy.amqp_url}?reconnect_interval=0.2", relay_after=1.0, publish_timeout=3.0
        )
        b = await space.open(relay_after=1.0, publish_timeout=3.0)
        c = await space.open(relay_after=1.0, publish_timeout=3.0)
        device = space.device()
        await a.ensure_queue(device)
        door = await c.enqueue_with_confirmation(device, "unlock", b"door", LONG)
        proxy.stall()
        first = asyncio.create_task(a.confirm_command(door))
        async with asyncio.timeout(10):
            while (await c.get_status(door)) is not CommandStatus.PENDING:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        last = c
        if how == "returns":
            await asyncio.wait_for(b.confirm_command(door), BOUND)
            last = b
        elif how == "cancelled":
            with suppress(TimeoutError):
                async with asyncio.timeout(rnd.uniform(0.01, 1.2)):
                    await b.confirm_command(door)
        else:
            second = asyncio.create_task(b.confirm_command(door))
            await asyncio.sleep(rnd.uniform(0.01, 0.9))
            await asyncio.wait_for(b.close(), BOUND)
            with suppress(QueueError):
                await asyncio.wait_for(second, BOUND)
        if last is c:
            await asyncio.wait_for(c.confirm_command(door), BOUND)
        after = await last.enqueue(device, b"after", LONG)
        try:
            got = await take(c, device, {b"door", b"after"}, 15)
        finally:
            proxy.resume()
        with suppress(QueueError):
            await asyncio.wait_for(first, BOUND)
        assert [p for _, p in got] == [b"door", b"after"], got
        assert [await c.get_status(i) for i in (door, after)] == [DELIVERED, DELIVERED]
        await asyncio.sleep(1.5)  # A's late copy reaches the queue: dropped at delivery
        assert await c.drain_pending(device) == []


# -- 3. stores of both queue types on one index ---------------------------------------------


@pytest.mark.parametrize("backend", matrix(ALL, ["redis"]))
async def test_both_queue_types_on_one_index_with_orphans_and_a_deleted_queue(
    backend: str, tmp_path: Path
) -> None:
    """Device queues classic. Killed writers leave orphans; quorum stores start (their
    relays meet the refusal); the operator deletes d0's queue, and a quorum store's enqueue
    declares it quorum; classic and quorum stores start and close while a producer of each
    type enqueues, one call at a time, to the devices its type matches, and more orphans
    appear. Every accepted command and orphan is handed out once, the enqueues in call
    order; at the end an orphan of a classic queue is published by the one classic store
    running beside two quorum ones (none keeps the lease from it)."""
    rnd = seeded()
    async with space_on(backend, tmp_path) as space:
        quorum = {"queue_type": QueueType.QUORUM}
        d0, d1, d2 = (space.device() for _ in range(3))
        writer = await space.open()
        for d in (d0, d1, d2):
            await writer.ensure_queue(d)  # classic
        want: dict[str, list[bytes]] = {d0: [], d1: [], d2: []}
        orphans: dict[str, set[bytes]] = {d0: set(), d1: set(), d2: set()}

        async def orphan(store: RabbitMQStore, device: str, tag: str) -> None:
            # Written and never published: a writer SIGKILLed after its commit.
            payload = f"{tag}-{device}".encode()
            await store.state.write([store.build(device, None, payload, LONG)], ())
            orphans[device].add(payload)

        for d in (d0, d1, d2):
            await orphan(writer, d, "o0")
        await writer.close()
        m1 = await space.open(relay_after=0.3, **quorum)
        m2 = await space.open(relay_after=0.3, **quorum)
        await relays_leave([m1, m2], [d0, d1, d2])  # their sweeps met the refusal
        with pytest.raises(QueueMismatch):
            await m1.enqueue(d1, b"refused", LONG)
        assert await m1.get_status(next(iter(await m1.get_pending(d0))).id) is (
            CommandStatus.PENDING
        )
        # The operator does what QueueMismatch says, for d0: deletes the (empty) queue.
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            await (await connection.channel()).queue_delete(m1.config.queue_name(d0))
        # Declares it quorum before a classic store's relay may (its orphan goes first).
        await m1.enqueue(d0, b"e0000", LONG)
        want[d0].append(b"e0000")
        classic_producer = await space.open(relay_after=0.3)
        n = 0

        async def produce(store: RabbitMQStore, devices: tuple[str, ...], rounds: int) -> None:
            nonlocal n
            for _ in range(rounds):
                for d in devices:
                    n += 1
                    payload = f"e{n:04d}".encode()
                    await store.enqueue(d, payload, LONG)  # returned: in call order
                    want[d].append(payload)
                await asyncio.sleep(rnd.uniform(0.0, 0.05))

        async def churn() -> None:
            for k in range(4):
                kind = {} if k % 2 else quorum
                store = await space.open(relay_after=0.3, **kind)
                if k == 1:
                    await orphan(store, d1, "o1")
                if k == 2:
                    await orphan(store, d0, "o1")
                await asyncio.sleep(rnd.uniform(0.2, 0.8))
                await asyncio.wait_for(store.close(), BOUND)

        async with asyncio.timeout(60):
            await asyncio.gather(
                produce(m1, (d0,), 12), produce(classic_producer, (d1, d2), 12), churn()
            )
        await classic_producer.close()
        await m2.close()
        m3 = await space.open(relay_after=0.3, **quorum)
        await asyncio.sleep(0.5)
        lone = await space.open(relay_after=0.3)  # the one classic store, beside m1 and m3
        await orphan(m3, d2, "o2")
        started = time.monotonic()
        got_classic = {d: await take(lone, d, set(want[d]) | orphans[d], 20) for d in (d1, d2)}
        print(f"the last orphan came after {time.monotonic() - started:.1f} s")
        got_quorum = await take(m3, d0, set(want[d0]) | orphans[d0], 20)
        for d, got in [*got_classic.items(), (d0, got_quorum)]:
            ids = [i for i, _ in got]
            assert len(ids) == len(set(ids)), f"{d}: handed out twice: {got}"
            payloads = [p for _, p in got]
            assert [p for p in payloads if p.startswith(b"e")] == want[d], (d, payloads)
            assert {p for p in payloads if p.startswith(b"o")} == orphans[d], (d, payloads)
