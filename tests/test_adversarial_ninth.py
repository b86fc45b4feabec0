"""Ninth adversarial round: the restarted relay's writer grace (22e9a58) and what is next to it.

A store that starts beside a writer whose publishes are unmarked (its broker slow, its index
link stalled, or the process SIGKILLed) finds those commands at its relay's first read and
holds its own commands to their devices behind them; past ``WRITER_GRACE`` it publishes them
ahead of what it owes. These scenarios use the public API only, on every state index, and
judge the documented promises: nothing accepted lost, nothing handed out twice within one
stream or one drain call, per device a call that returned before another began is handed out
first, nothing stale.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import QueueType, RabbitMQConfig, RabbitMQStore
from tests.child_scripts import start_script
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import matrix, seeded, unique
from tests.tcp_proxy import StallProxy
from tests.test_adversarial_fifth_wire import _urls
from tests.test_adversarial_seams import BACKENDS, state_url_for

QUEUES = [QueueType.CLASSIC, QueueType.QUORUM]

pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]
LONG = 600.0


@dataclass
class Space:
    """One state index and one exchange shared by several stores (as processes would)."""

    url: str
    exchange: str
    devices: set[str] = field(default_factory=set)
    stores: list[RabbitMQStore] = field(default_factory=list)

    def device(self) -> str:
        name = unique("d")
        self.devices.add(name)
        return name

    async def open(
        self, amqp: str = AMQP_URL, *, state_url: str | None = None, **config: Any
    ) -> RabbitMQStore:
        config.setdefault("relay_interval", 1.0)
        store = await asyncio.wait_for(
            RabbitMQStore.connect(
                amqp,
                state_url=state_url or self.url,
                config=RabbitMQConfig(exchange=self.exchange, **config),
            ),
            20,
        )
        self.stores.append(store)
        return store


@asynccontextmanager
async def space_on(backend: str, tmp_path: Path) -> AsyncIterator[Space]:
    async with state_url_for(backend, tmp_path) as url:
        space = Space(url, unique("adv9."))
        try:
            yield space
        finally:
            for store in space.stores:
                with suppress(Exception):
                    await asyncio.wait_for(store.close(), 15)
            await delete_namespace(space.exchange, sorted(space.devices))


async def take(
    store: RabbitMQStore, device: str, want: set[bytes], seconds: float
) -> list[tuple[str, bytes]]:
    """Consumes ``device`` until every payload of ``want`` came or ``seconds`` passed."""
    got: list[tuple[str, bytes]] = []
    async with store.consume(device) as commands:
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                async for command in commands:
                    got.append((command.id, command.payload))
                    if want <= {p for _, p in got}:
                        break
    return got


def twice(got: list[tuple[str, bytes]]) -> dict[str, int]:
    return {i: n for i, n in Counter(i for i, _ in got).items() if n > 1}


# -- 1. a live writer whose broker stalls: its unpublished commands fill the first read -------


async def _held_behind_a_stalled_writer(
    backend: str, tmp_path: Path, *, relay_batch: int, same_device: bool
) -> tuple[list[bytes], float]:
    async with (
        StallProxy(5672, max_connections=16) as broker,
        space_on(backend, tmp_path) as space,
    ):
        device = space.device()
        other = device if same_device else space.device()
        running = await space.open(relay_after=6.0, publish_timeout=2.0)
        await running.ensure_queue(device)
        await running.ensure_queue(other)
        # The writer: its broker link goes through the proxy, its index is direct.
        writer = await space.open(
            f"{broker.amqp_url}?reconnect_interval=0.2", relay_after=6.0, publish_timeout=8.0
        )
        await writer.ensure_queue(other)
        broker.stall()
        writes = [
            asyncio.create_task(writer.enqueue(other, f"W{n}".encode(), LONG)) for n in range(8)
        ]
        try:
            async with asyncio.timeout(10):
                while len(await running.get_pending(other)) < 8:  # noqa: ASYNC110 - polling
                    await asyncio.sleep(0.05)
            # A store starts now: its first read finds the writer's 8 commands unpublished.
            restarted = await space.open(
                relay_after=6.0, publish_timeout=2.0, relay_batch=relay_batch
            )
            start = time.monotonic()
            await restarted.enqueue(device, b"Y", LONG)
            took = time.monotonic() - start
            # Begun after Y's call returned, on a store that publishes directly.
            await running.enqueue(device, b"Z", LONG)
        finally:
            broker.resume()
            await asyncio.gather(*writes, return_exceptions=True)
        got = await take(running, device, {b"Y", b"Z"}, 15)
    return [p for _, p in got if p in (b"Y", b"Z")], took


@pytest.mark.parametrize("backend", BACKENDS)
async def test_held_call_behind_a_stalled_writer_is_not_overtaken(
    backend: str, tmp_path: Path
) -> None:
    """The fixed case: a store starts while a live writer's 8 commands to the device wait
    for a stalled broker (written, unpublished); the store's enqueue of Y is held behind
    them, past the writer's grace published after them, and returns; Z, begun afterwards on
    another store, comes after Y."""
    tail, took = await _held_behind_a_stalled_writer(
        backend, tmp_path, relay_batch=500, same_device=True
    )
    assert tail == [b"Y", b"Z"], f"Y's call returned after {took:.2f}s; got {tail}"


@pytest.mark.parametrize("same_device", [True, False], ids=["same-device", "other-device"])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_held_call_beyond_a_full_first_read_is_not_overtaken(
    backend: str, same_device: bool, tmp_path: Path
) -> None:
    """The same with ``relay_batch=4``: the first read comes back full of the writer's
    commands (to the device, or to another device), and Y lies beyond it. "A call whose
    command goes through the relay returns once the relay has published it ...: a call
    another process begins after it returned is published after it." """
    tail, took = await _held_behind_a_stalled_writer(
        backend, tmp_path, relay_batch=4, same_device=same_device
    )
    assert tail == [b"Y", b"Z"], f"Y's call returned after {took:.2f}s; got {tail}"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_held_call_beyond_several_full_reads_is_not_overtaken(
    backend: str, tmp_path: Path
) -> None:
    """The same with ``relay_batch=2``: the writer's 8 commands fill four reads. Each was
    unpublished when the store started, so the writer's grace runs from then for all of
    them; counted from when each read reached it, four graces outlasted Y's call (grace plus
    ``publish_timeout``), which returned with Y still owed, and Z went first."""
    tail, took = await _held_behind_a_stalled_writer(
        backend, tmp_path, relay_batch=2, same_device=False
    )
    assert tail == [b"Y", b"Z"], f"Y's call returned after {took:.2f}s; got {tail}"


# -- 2. a live writer whose publish marks are held up by a stalled index link ------------------


@dataclass
class Got:
    id: str
    payload: bytes
    reader: str


async def read_both(
    stream_store: RabbitMQStore,
    drain_store: RabbitMQStore,
    device: str,
    want: set[bytes],
    seconds: float,
) -> list[Got]:
    """A stream on one store and drain calls on another until ``want`` came."""
    got: list[Got] = []
    stop = asyncio.Event()

    async def stream() -> None:
        async with stream_store.consume(device) as commands:
            while not stop.is_set():
                try:
                    async with asyncio.timeout(0.3):
                        command = await anext(commands)
                except TimeoutError:
                    continue
                got.append(Got(command.id, command.payload, "stream"))
                await asyncio.sleep(0.005)

    async def drains() -> None:
        calls = 0
        while not stop.is_set():
            calls += 1
            for record in await drain_store.drain_commands(device):
                got.append(Got(record.id, record.payload, f"drain:{calls}"))
            await asyncio.sleep(0.03)

    tasks = [asyncio.create_task(stream()), asyncio.create_task(drains())]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not want <= {g.payload for g in got}:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # copies still on their way
    stop.set()
    await asyncio.gather(*tasks)
    return got


def judge(got: list[Got], ordered: list[bytes], accepted: set[bytes]) -> None:
    """Nothing accepted lost; nothing twice within a reader (a stream, a drain call); within
    each reader ``ordered`` (each call returned before the next began) in that order."""
    payloads = {g.payload for g in got}
    lost = sorted(accepted - payloads)
    repeated: dict[str, list[bytes]] = {}
    disorder = []
    for reader in {g.reader for g in got}:
        mine = [g for g in got if g.reader == reader]
        counts = Counter(g.id for g in mine)
        dup = [g.payload for g in mine if counts[g.id] > 1]
        if dup:
            repeated[reader] = dup
        seq = [ordered.index(g.payload) for g in mine if g.payload in ordered]
        if seq != sorted(seq):
            disorder.append((reader, [ordered[i] for i in seq]))
    assert not lost, f"lost: {lost}"
    assert not repeated, f"handed out twice within one reader: {repeated}"
    assert not disorder, f"out of order: {disorder}"


@pytest.mark.parametrize(
    ("backend", "queue_type"),
    matrix(
        [(b, q) for b in ["postgres", "redis"] for q in QUEUES],
        [("postgres", QueueType.CLASSIC), ("redis", QueueType.QUORUM)],
    ),
    ids=str,
)
async def test_a_second_store_beside_a_writer_with_stalled_marks_keeps_order_and_once(
    backend: str, queue_type: QueueType, tmp_path: Path
) -> None:
    """A live writer enqueues A0..A9 to a device (each returned), then its index link stalls
    for 2.5 s: its last publish marks cannot land (nor its next enqueue). A store starting
    meanwhile finds them unmarked, and past the writer's grace publishes copies ahead of its
    own Y; Z follows on a third store. A stream and drain calls on two more stores read the
    device: nothing lost, nothing twice within a reader, A0..A9, Y, Z in order in each."""
    rng = seeded()
    async with (
        StallProxy(5432 if backend == "postgres" else 6379, max_connections=64) as index,
        _urls(backend, index.port) as (direct, proxied),
    ):
        space = Space(direct, unique("adv9m."))
        try:
            kw: dict[str, Any] = {"relay_after": 8.0, "queue_type": queue_type}
            device = space.device()
            running = await space.open(**kw)
            stream_store = await space.open(**kw)
            drain_store = await space.open(**kw)
            writer = await space.open(state_url=proxied, publish_timeout=3.0, **kw)
            ordered = [f"A{n}".encode() for n in range(10)]
            for payload in ordered:
                await writer.enqueue(device, payload, LONG)
            await asyncio.sleep(rng.uniform(0, 0.03))
            index.stall()
            late = asyncio.create_task(writer.enqueue(device, b"A10", LONG))
            restarted = await space.open(**kw)
            await restarted.enqueue(device, b"Y", LONG)
            await running.enqueue(device, b"Z", LONG)
            ordered += [b"Y", b"Z"]
            await asyncio.sleep(max(0.0, 2.5 - 1.0))
            index.resume()
            with suppress(Exception):
                await asyncio.wait_for(late, 10)
            accepted = set(ordered)
            if late.done() and not late.cancelled() and late.exception() is None:
                accepted.add(b"A10")
            got = await read_both(stream_store, drain_store, device, accepted, 20)
        finally:
            index.resume()
            for store in space.stores:
                with suppress(Exception):
                    await asyncio.wait_for(store.close(), 15)
            await delete_namespace(space.exchange, sorted(space.devices))
    print([(g.reader, g.payload) for g in got])
    judge(got, ordered, accepted)


# -- 3. several stores starting at once after a SIGKILLed mixed producer ----------------------

MIXED_PRODUCER = """
import asyncio, json, sys, time
from amqp_queue import QueueType, RabbitMQConfig, RabbitMQStore

async def main() -> None:
    amqp, state, exchange, device, other, queue_type = sys.argv[1:7]
    store = await RabbitMQStore.connect(
        amqp, state_url=state,
        config=RabbitMQConfig(exchange=exchange, relay_after=6.0, relay_interval=1.0,
                              queue_type=QueueType(queue_type)),
    )
    print(json.dumps({"ev": "ready"}), flush=True)

    async def call(kind: str, payload: str) -> None:
        start = time.monotonic()
        if kind == "plain":
            await store.enqueue(device, payload.encode(), 600)
        elif kind == "latest":
            await store.enqueue_or_update(device, "sp", payload.encode(), 600)
        else:
            await store.enqueue_many([device, other], payload.encode(), 600)
        print(json.dumps({"ev": "done", "kind": kind, "payload": payload, "start": start,
                          "end": time.monotonic()}), flush=True)

    n = 0
    while True:
        # Four calls at once now and then: more publish marks in flight at the kill.
        kinds = ["plain", "latest", "many", "plain"]
        await asyncio.gather(*(call(k, f"{k[0].upper()}{n}.{i}") for i, k in enumerate(kinds)))
        n += 1

asyncio.run(main())
"""


@dataclass
class Call:
    payload: bytes
    start: float
    end: float
    kind: str = "plain"


def judge_calls(got: list[Got], calls: list[Call], *, stale: set[bytes]) -> None:
    """Per reader: nothing twice, and a call that returned before another began is handed
    out first; overall: every accepted non-latest command handed out, no ``stale`` one."""
    by_payload = {c.payload: c for c in calls}
    handed = {g.payload for g in got}
    lost = sorted(c.payload for c in calls if c.kind != "latest" and c.payload not in handed)
    bad = sorted(handed & stale)
    repeated: dict[str, list[bytes]] = {}
    disorder: list[tuple[str, bytes, bytes]] = []
    for reader in {g.reader for g in got}:
        mine = [g for g in got if g.reader == reader]
        counts = Counter(g.id for g in mine)
        if dup := [g.payload for g in mine if counts[g.id] > 1]:
            repeated[reader] = dup
        seq = [by_payload[g.payload] for g in mine if g.payload in by_payload]
        for i, later in enumerate(seq):
            for earlier in seq[i + 1 :]:
                if earlier.end < later.start:
                    disorder.append((reader, later.payload, earlier.payload))
    assert not lost, f"lost: {lost}"
    assert not bad, f"stale hand-outs: {bad}"
    assert not repeated, f"handed out twice within one reader: {repeated}"
    assert not disorder, f"handed out before a call that returned before it began: {disorder[:5]}"


@pytest.mark.parametrize(
    ("backend", "queue_type"),
    matrix(
        [(b, q) for b in BACKENDS for q in QUEUES],
        [
            ("sqlite", QueueType.CLASSIC),
            ("postgres", QueueType.QUORUM),
            ("redis", QueueType.CLASSIC),
        ],
    ),
    ids=str,
)
async def test_stores_starting_together_after_a_killed_producer_keep_order(
    backend: str, queue_type: QueueType, tmp_path: Path
) -> None:
    """A producer process (plain, latest-wins and fan-out calls, four at once) is SIGKILLed;
    three stores start at once on its state, each finding its unmarked commands, and call
    plain, latest-wins and fan-out enqueues to the same devices one after another and
    concurrently; a store already running follows. A stream and drain calls read the
    device: every returned call handed out (the last latest-wins version), none twice in a
    reader, none stale, and per reader a call that returned before another began first."""
    rng = seeded()
    async with space_on(backend, tmp_path) as space:
        device, other = space.device(), space.device()
        kw: dict[str, Any] = {"relay_after": 6.0, "queue_type": queue_type}
        running = await space.open(**kw)
        drain_store = await space.open(**kw)
        await running.ensure_queue(device)
        await running.ensure_queue(other)
        proc, events = await start_script(
            MIXED_PRODUCER,
            AMQP_URL,
            space.url,
            space.exchange,
            device,
            other,
            str(queue_type),
        )
        await asyncio.sleep(rng.uniform(0.3, 0.9))
        if proc.returncode is not None:
            # It loops until killed: ended by itself, it failed (its error is not kept).
            pytest.fail(f"the producer ended by itself with {proc.returncode} before the kill")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await proc.reader
        calls = [
            Call(e["payload"].encode(), e["start"], e["end"], e["kind"])
            for e in events
            if e["ev"] == "done"
        ]
        stores = await asyncio.gather(*(space.open(**kw) for _ in range(3)))

        async def call(store: RabbitMQStore, kind: str, payload: bytes) -> None:
            start = time.monotonic()
            if kind == "plain":
                await store.enqueue(device, payload, LONG)
            elif kind == "latest":
                await store.enqueue_or_update(device, "sp", payload, LONG)
            else:
                await store.enqueue_many([device, other], payload, LONG)
            calls.append(Call(payload, start, time.monotonic(), kind))

        async def session(n: int, store: RabbitMQStore) -> None:
            for k, kind in enumerate(["plain", "many", "plain", "latest", "plain"]):
                await call(store, kind, f"S{n}.{k}".encode())
                await asyncio.sleep(rng.uniform(0, 0.2))

        await asyncio.gather(*(session(n, s) for n, s in enumerate(stores)))
        await call(running, "latest", b"Zsp")
        await call(running, "plain", b"Z")
        versions = [c for c in calls if c.kind == "latest"]
        stale = {c.payload for c in versions if c.payload != b"Zsp"}
        want = {c.payload for c in calls if c.kind != "latest"} | {b"Zsp"}
        got = await read_both(running, drain_store, device, want, 20)
    print(f"{len(events)} producer calls returned; {len(got)} hand-outs")
    judge_calls(got, calls, stale=stale)


# -- 4. operator HTTP cancels racing library readers, the sidecar SIGKILLed once ---------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_http_cancel_that_returned_is_never_followed_by_its_hand_out(
    backend: str, tmp_path: Path
) -> None:
    """A lane POSTs numbered commands to one device through ``amqp-queue serve`` and cancels
    about one in three over HTTP at once; the sidecar is SIGKILLed and started again mid-run
    (its relay then holds behind what it left unmarked). A stream and drain calls on two
    library stores read the device. No command is handed out to a reader that asked after
    its cancel was answered 2xx; every 201 not cancelled arrives; nothing twice in a reader;
    per reader in the lane's order."""
    import httpx

    from tests.test_adversarial_restarts_seventh import Sidecar

    rng = seeded()
    async with space_on(backend, tmp_path) as space:
        device = space.device()
        kw: dict[str, Any] = {"relay_after": 5.0}
        stream_store = await space.open(**kw)
        drain_store = await space.open(**kw)
        await stream_store.ensure_queue(device)
        sidecar = Sidecar(space.url, space.exchange)
        await sidecar.start()
        headers = {"Authorization": f"Bearer {Sidecar.TOKEN}"}
        calls: list[Call] = []
        cancelled: dict[str, float] = {}  # id -> when its 2xx came
        ids: dict[bytes, str] = {}
        taken: list[tuple[Got, float]] = []
        stop = asyncio.Event()

        async def stream() -> None:
            async with stream_store.consume(device) as commands:
                while not stop.is_set():
                    asked = time.monotonic()
                    try:
                        async with asyncio.timeout(0.3):
                            command = await anext(commands)
                    except TimeoutError:
                        continue
                    taken.append((Got(command.id, command.payload, "stream"), asked))
                    await asyncio.sleep(rng.uniform(0, 0.01))

        async def drains() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                asked = time.monotonic()
                for record in await drain_store.drain_commands(device):
                    taken.append((Got(record.id, record.payload, f"drain:{n}"), asked))
                await asyncio.sleep(rng.uniform(0, 0.05))

        async def lane(client: httpx.AsyncClient, first: int, count: int) -> None:
            for n in range(first, first + count):
                payload = f"H{n:04d}".encode()
                start = time.monotonic()
                try:
                    answer = await client.post(
                        f"/devices/{device}/commands",
                        json={"payload": payload.decode(), "ttl": LONG},
                    )
                except httpx.HTTPError:
                    continue  # the sidecar died under it: not accepted as far as we know
                if answer.status_code != 201:
                    continue
                ids[payload] = answer.json()["id"]
                calls.append(Call(payload, start, time.monotonic()))
                if rng.random() < 0.35:
                    await asyncio.sleep(rng.uniform(0, 0.02))
                    with suppress(httpx.HTTPError):
                        reply = await client.post(f"/commands/{ids[payload]}/cancel")
                        if 200 <= reply.status_code < 300:
                            cancelled[ids[payload]] = time.monotonic()

        readers = [asyncio.create_task(stream()), asyncio.create_task(drains())]
        try:
            async with httpx.AsyncClient(base_url=sidecar.url, headers=headers, timeout=20) as c:
                await lane(c, 0, 40)
            await sidecar.kill()
            sidecar = Sidecar(space.url, space.exchange)
            await sidecar.start()
            async with httpx.AsyncClient(base_url=sidecar.url, headers=headers, timeout=20) as c:
                await lane(c, 40, 40)
            want = {c.payload for c in calls if ids[c.payload] not in cancelled}
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not want <= {g.payload for g, _ in taken}:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*readers, return_exceptions=True)
            await sidecar.kill()
    stale = [
        (g.reader, g.payload, round(asked - cancelled[g.id], 3))
        for g, asked in taken
        if g.id in cancelled and asked > cancelled[g.id]
    ]
    assert not stale, f"handed out after its cancel was answered: {stale}"
    live = [c for c in calls if ids[c.payload] not in cancelled]
    judge_calls([g for g, _ in taken if g.id not in cancelled], live, stale=set())
