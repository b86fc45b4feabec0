"""Sixteenth adversarial round: this session's changes under faults. A store's ``consume()``
streams now share their delivery-mark commits (``amqp_queue/mark_commits.py``): hundreds of
streams through one store while its index link stalls or loses its replies, streams cancelled
mid-batch, the store closed with streams open. The Redis index waits for a pooled connection
(100 of them, 10 s): more calls than that while Redis's link stalls. A call whose command goes
through a failing relay waits for the relay's next try: enqueues from two stores while one's
broker link stalls or is closed, or its index link stalls or is cut. A repeated
``confirm_rollout`` waits for the first call's publishes: the first confirmer cancelled, its
store closed or its broker link cut, while two other stores confirm again and again. Public
API to act, every index where the fault can exist, the real broker and services. Judged:
every call ends (a result or a ``QueueError``) within a bound, nothing accepted lost, nothing
handed out twice but a documented redelivery (the status then still ends DELIVERED), every
command handed out whose loop body finished ends DELIVERED, per device a call that returned
before another began handed out first."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import CommandStatus, QueueError, RabbitMQStore
from tests.faults.broker import close_connections_named
from tests.rabbitmq_support import delete_namespace, outbox_emptied
from tests.support import FULL_MATRIX, matrix, seeded, unique
from tests.tcp_proxy import StallProxy
from tests.test_adversarial_fifteenth import ends, twice
from tests.test_adversarial_fifth_wire import _urls
from tests.test_adversarial_ninth import LONG, Space, space_on, take

ALL = ["sqlite", "postgres", "redis"]
WIRED = ["postgres", "redis"]
DELIVERED = CommandStatus.DELIVERED
WAITING = CommandStatus.AWAITING_CONFIRMATION
BOUND = 30.0  # seconds any one call may take before it counts as hung
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@dataclass
class Rig:
    """A space; ``faulted`` reaches the index (``state``) or the broker (``amqp``) through
    ``link``, a :class:`StallProxy`, when the scenario faults that link."""

    space: Space
    link: StallProxy | None = None
    state: str | None = None
    amqp: str | None = None
    name: str = field(default_factory=lambda: unique("r16-"))


@asynccontextmanager
async def rig(
    backend: str, tmp_path: Path, *, index_link: bool, bound: float = 2.0, broker_link: bool
) -> AsyncIterator[Rig]:
    """A space on ``backend``; with ``index_link`` (PostgreSQL, Redis) its index also reached
    through a proxy (statements bounded by ``bound`` seconds), with ``broker_link`` the broker
    reached through one (connections named, reconnecting every 0.2 s)."""
    async with AsyncExitStack() as stack:
        if index_link:
            target = 5432 if backend == "postgres" else 6379
            link = await stack.enter_async_context(StallProxy(target, max_connections=400))
            direct, proxied = await stack.enter_async_context(_urls(backend, link.port))
            option = "command_timeout" if backend == "postgres" else "socket_timeout"
            space = Space(direct, unique("adv16."))
            r = Rig(space, link, state=f"{proxied}&{option}={bound}")
        else:
            space = await stack.enter_async_context(space_on(backend, tmp_path))
            r = Rig(space)
        if broker_link:
            r.link = await stack.enter_async_context(StallProxy(5672, max_connections=64))
            r.amqp = f"{r.link.amqp_url}?name={r.name}&reconnect_interval=0.2"
        try:
            yield r
        finally:
            if r.link is not None:
                r.link.resume()
                await r.link.restore()
            if index_link:
                for store in space.stores:
                    with suppress(Exception):
                        await asyncio.wait_for(store.close(), 15)
                await delete_namespace(space.exchange, sorted(space.devices))


async def open_faulted(r: Rig, **config: Any) -> RabbitMQStore:
    """A store whose faulted link goes through the proxy."""
    if r.amqp is not None:
        return await r.space.open(r.amqp, **config)
    return await r.space.open(state_url=r.state, **config)


async def statuses(store: RabbitMQStore, ids: list[str]) -> Counter[CommandStatus]:
    return Counter(await asyncio.gather(*(store.get_status(i) for i in ids)))


# -- 1. hundreds of streams through one store while its index link stalls -------------------


@dataclass
class Handed:
    id: str
    payload: bytes
    stream: int
    finished: bool = False


def _stream_cases() -> list[Any]:
    every = [
        *((b, f, e) for b in WIRED for f in ("stall", "replies") for e in ("cancel", "close")),
        *(("sqlite", "none", e) for e in ("cancel", "close")),
    ]
    return matrix(every, [("redis", "replies", "cancel")])


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("backend", "fault", "ending"), _stream_cases())
async def test_hundreds_of_streams_share_mark_commits_while_the_index_stalls(
    backend: str, fault: str, ending: str, tmp_path: Path
) -> None:
    """Gateway G streams hundreds of devices (three commands each, loop bodies of a few
    ms) through one store. Once the streams are busy, G's index link stalls for 2 s (every
    byte held, or only the replies: the marks land unanswered); meanwhile a quarter of the
    stream tasks are cancelled at random moments (mid-body, or waiting for the next command),
    or G is closed with every stream open. Every stream ends within the bound; store Q
    (direct) drains what is left. Nothing lost; nothing handed out twice, but a command whose
    stream was cancelled or closed may come again (its mark may not have landed); every
    command handed out whose loop body finished ends DELIVERED; nothing stays pending."""
    rnd = seeded()
    count = 300 if FULL_MATRIX else 160
    wired = fault != "none"
    async with rig(backend, tmp_path, index_link=wired, bound=3.0, broker_link=False) as r:
        sp = r.space
        g = await (open_faulted(r, publish_timeout=3.0) if wired else sp.open(publish_timeout=3.0))
        q = await sp.open(publish_timeout=3.0)
        prefix = unique("s")
        devices = [f"{prefix}{n:04d}" for n in range(count)]
        sp.devices.update(devices)
        ids: list[str] = []
        for payload in (b"c0", b"c1", b"c2"):
            ids += (await q.enqueue_many(devices, payload, LONG)).command_ids
        handed: list[Handed] = []
        abnormal: set[int] = set()
        busy = asyncio.Event()

        async def stream(n: int, device: str) -> None:
            try:
                async with g.consume(device) as commands:
                    async for command in commands:
                        h = Handed(command.id, command.payload, n)
                        handed.append(h)
                        if len(handed) >= count // 2:
                            busy.set()
                        await asyncio.sleep(rnd.uniform(0.0, 0.01))
                        h.finished = True
                        if command.payload == b"c2":
                            break
            except QueueError:
                abnormal.add(n)
            except asyncio.CancelledError:
                abnormal.add(n)
                raise

        tasks = [asyncio.ensure_future(stream(n, d)) for n, d in enumerate(devices)]
        await asyncio.wait_for(busy.wait(), BOUND)
        if wired:
            assert r.link is not None
            r.link.stall(replies_only=fault == "replies")
        try:
            if ending == "cancel":
                victims = rnd.sample(range(count), count // 4)
                for n in victims:
                    await asyncio.sleep(rnd.uniform(0.0, 2.0 / len(victims)))
                    tasks[n].cancel()
            else:
                await asyncio.sleep(rnd.uniform(0.0, 0.5))
                closing = asyncio.ensure_future(g.close())
                await asyncio.sleep(2.0)
        finally:
            if r.link is not None:
                r.link.resume()
        if ending == "close":
            await ends(closing)
            abnormal.update(range(count))
        began = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), BOUND)
        print(f"streams ended {time.monotonic() - began:.1f} s after the link came back")
        unclear = [x for x in results if isinstance(x, BaseException)]
        unclear = [x for x in unclear if not isinstance(x, asyncio.CancelledError)]
        assert not unclear, unclear[:3]
        # What the streams did not take (and what they may have left unmarked) Q takes.
        drained = await asyncio.wait_for(
            asyncio.gather(*(q.drain_commands(d) for d in devices)), BOUND
        )
        got = [(h.id, h.payload) for h in handed] + [
            (c.id, c.payload) for batch in drained for c in batch
        ]
        repeated = twice(got)
        first_by: dict[str, Handed] = {}
        for h in handed:
            first_by.setdefault(h.id, h)
        unexplained = {
            i: n
            for i, n in repeated.items()
            if i not in first_by or first_by[i].stream not in abnormal
        }
        print(
            f"{len(handed)} handed out by G, {sum(map(len, drained))} drained by Q, "
            f"{len(repeated)} twice, {len(abnormal)} streams ended abnormally"
        )
        assert not unexplained, f"handed out twice from a stream that ended normally: {unexplained}"
        missing = set(ids) - {i for i, _ in got}
        assert not missing, f"{len(missing)} commands never handed out"
        finished = [h.id for h in handed if h.finished]
        async with asyncio.timeout(BOUND):
            while (counts := await statuses(q, finished)) != {DELIVERED: len(finished)}:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        print(counts)
        assert await statuses(q, ids) == {DELIVERED: len(ids)}


# -- 2. more calls than the Redis pool holds while Redis's link stalls ---------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stall", matrix([1.0, 3.0, 6.0], [1.0]))
async def test_more_calls_than_the_redis_pool_while_its_link_stalls(
    stall: float, tmp_path: Path
) -> None:
    """Store G reaches Redis through a proxy (socket timeout 2 s); 40 of its streams wait
    on their devices. Redis's link stalls; meanwhile G starts 150 enqueues, 150 status
    reads, 40 cancels and a plain enqueue to each streamed device, well over the pool's 100
    connections; the link comes back after ``stall`` seconds. Every call ends with a result
    or a QueueError within the bound; the store works afterwards (an enqueue, a status, a
    drain); every enqueue that returned is handed out once, no cancel that returned lets
    its command out, every stream hands out its command once."""
    rnd = seeded()
    async with rig("redis", tmp_path, index_link=True, bound=2.0, broker_link=False) as r:
        sp = r.space
        assert r.link is not None
        g = await open_faulted(r, publish_timeout=3.0)
        q = await sp.open(publish_timeout=3.0)
        devices = [sp.device() for _ in range(10)]
        watched = [sp.device() for _ in range(40)]
        for d in [*devices, *watched]:
            await q.ensure_queue(d)
        known = [await q.enqueue(devices[n % 10], f"k{n}".encode(), LONG) for n in range(40)]
        got: dict[str, list[tuple[str, bytes]]] = {d: [] for d in watched}

        async def stream(d: str) -> None:
            # As a gateway does, a stream that failed is opened again: under load a window's
            # index read can outlast the link's 2 s socket timeout while it stalls (seen once
            # in the test command: a stream ended before its command came).
            while True:
                try:
                    async with g.consume(d) as commands:
                        async for command in commands:
                            got[d].append((command.id, command.payload))
                            if command.payload == b"w":
                                return
                    return
                except QueueError as exc:
                    print(f"the stream of {d} failed and opens again: {exc!r}")
                await asyncio.sleep(0.1)

        streams = [asyncio.ensure_future(stream(d)) for d in watched]
        await asyncio.sleep(1.0)  # each stream waits on its queue
        r.link.stall(replies_only=rnd.random() < 0.5)
        began = time.monotonic()
        enqueues = [
            asyncio.ensure_future(g.enqueue(rnd.choice(devices), f"e{n}".encode(), LONG))
            for n in range(150)
        ]
        reads = [asyncio.ensure_future(g.get_status(rnd.choice(known))) for _ in range(150)]
        cancels = [asyncio.ensure_future(g.cancel_command(i)) for i in known]
        to_watched = [asyncio.ensure_future(g.enqueue(d, b"w", LONG)) for d in watched]
        try:
            await asyncio.sleep(stall)
        finally:
            r.link.resume()
        outcomes = [await ends(t) for t in [*enqueues, *reads, *cancels, *to_watched]]
        took = time.monotonic() - began
        failed = sum(o is not None for o in outcomes)
        print(f"{len(outcomes)} calls ended within {took:.1f} s, {failed} with a QueueError")
        # Afterwards the store works.
        device = sp.device()
        await q.ensure_queue(device)
        after = await asyncio.wait_for(g.enqueue(device, b"after", LONG), 10)
        assert await asyncio.wait_for(g.get_status(after), 10) is CommandStatus.PENDING
        assert await asyncio.wait_for(g.drain_pending(device), 10) == [b"after"]
        # What a watched device's call returned reaches its stream, once; a stream whose
        # call failed takes what the index holds, if anything.
        for d, t in zip(watched, to_watched, strict=True):
            if t.exception() is not None:
                await q.enqueue(d, b"w", LONG)
        for s in streams:
            await ends(s)
        for d in watched:
            payloads = [p for _, p in got[d]]
            assert b"w" in payloads, (d, payloads)
            assert not twice(got[d]), (d, payloads)
        cancelled = {i for i, t in zip(known, cancels, strict=True) if t.exception() is None}
        returned = {t.result() for t in enqueues if t.exception() is None}
        handed = [c for d in devices for c in await q.drain_commands(d)]
        ids = [c.id for c in handed]
        assert not {i for i, n in Counter(ids).items() if n > 1}
        assert not cancelled & set(ids), "a command cancelled before the drain handed out"
        assert returned <= set(ids), f"{len(returned - set(ids))} returned enqueues lost"
        for i in cancelled:
            assert await q.get_status(i) is CommandStatus.CANCELLED
        assert [await q.get_status(i) for i in returned] == [DELIVERED] * len(returned)


# -- 3. enqueues through a failing relay: the bound and the order across two stores ----------


@dataclass
class Call:
    store: str
    device: str
    payload: bytes
    began: float
    ended: float = 0.0
    id: str | None = None
    error: BaseException | None = None


# Found by this round: a call that returns with its command owed (its publish timed out on
# a stalled link, its wait for the relay ran out, or the relay's next try failed at once on
# a closed connection: PublishWaits.failed wakes it) leaves the command to P's relay, and a
# call store Q begins after that return publishes directly, ahead of it. The contract
# (design.md) keeps that order "without a broker or network fault"; docs/delivery.md promised
# it through one too, and now says where it ends. A call now waits through the relay's failed
# tries for BROKER_RETRY_WAIT after a broker failure (a reconnect may come first).
OVERTAKEN = pytest.mark.xfail(
    strict=True,
    reason="known limit (docs/delivery.md): during a broker fault a call returns with its "
    "command owed after BROKER_RETRY_WAIT, and another store's later call goes first",
)
# A closed connection comes back in moments, and the call waits through the failed tries for
# BROKER_RETRY_WAIT: whether the reconnect comes first is timing (SQLite passed, Redis not).
RACY = pytest.mark.xfail(strict=False, reason=OVERTAKEN.kwargs["reason"] + " (racy here)")


def _relay_cases() -> list[Any]:
    every = [
        *(pytest.param(b, "broker-stall", marks=OVERTAKEN) for b in ALL),
        *(pytest.param(b, "broker-close", marks=RACY) for b in ALL),
        *((b, f) for b in WIRED for f in ("index-stall", "index-cut")),
    ]
    return matrix(every, [pytest.param("sqlite", "broker-stall", marks=OVERTAKEN)])


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("backend", "fault"), _relay_cases())
async def test_enqueues_through_a_failing_relay_keep_the_bound_and_the_order(
    backend: str, fault: str, tmp_path: Path
) -> None:
    """Stores P (its broker or index link faulted) and Q (direct) enqueue to two devices
    back to back, each call begun once its store's previous call ended. Meanwhile P's broker
    link stalls for 4.5 s, or the broker closes P's connections five times, or P's index link stalls
    for 2.5 s or is cut for 2 s. Each enqueue that returns does so within publish_timeout
    plus the writer's grace and a margin (plus the statement bound on an index fault); every
    command a returned call names is handed out, once; per device, a call that returned
    before another began (either store) is handed out first."""
    rnd = seeded()
    publish_timeout = 1.5
    on_index = fault.startswith("index")
    async with rig(
        backend, tmp_path, index_link=on_index, bound=1.0, broker_link=not on_index
    ) as r:
        sp = r.space
        link = r.link
        assert link is not None
        p = await open_faulted(r, publish_timeout=publish_timeout, relay_after=2.0)
        q = await sp.open(publish_timeout=publish_timeout, relay_after=2.0)
        devices = [sp.device() for _ in range(2)]
        for d in devices:
            await q.ensure_queue(d)
            await p.ensure_queue(d)
        calls: list[Call] = []
        stop = asyncio.Event()

        async def producer(name: str, store: RabbitMQStore) -> None:
            n = 0
            while not stop.is_set():
                call = Call(name, rnd.choice(devices), f"{name}{n:04d}".encode(), time.monotonic())
                calls.append(call)
                try:
                    call.id = await asyncio.wait_for(
                        store.enqueue(call.device, call.payload, LONG), BOUND
                    )
                except QueueError as exc:
                    call.error = exc
                    await asyncio.sleep(0.05)
                except TimeoutError:
                    pytest.fail(f"{name}'s enqueue still running after {BOUND} s")
                call.ended = time.monotonic()
                n += 1
                await asyncio.sleep(rnd.uniform(0.0, 0.02))

        async def faults() -> None:
            await asyncio.sleep(rnd.uniform(0.3, 0.8))
            print(f"fault at {time.monotonic() - t0:.2f} s")
            if fault == "broker-stall":
                link.stall()
                await asyncio.sleep(4.5)
                link.resume()
            elif fault == "broker-close":
                for _ in range(5):
                    closed = await asyncio.to_thread(close_connections_named, r.name)
                    print(f"closed {closed} connections of P")
                    await asyncio.sleep(rnd.uniform(0.3, 1.0))
            elif fault == "index-stall":
                link.stall(replies_only=rnd.random() < 0.5)
                await asyncio.sleep(2.5)
                link.resume()
            else:
                await link.cut()
                await asyncio.sleep(2.0)
                await link.restore()
            # Real time on purpose: the producers go on calling through P's relay's next
            # try after the fault (the calls made then are judged too).
            await asyncio.sleep(2.5)
            stop.set()

        t0 = time.monotonic()
        await asyncio.gather(faults(), producer("P", p), producer("Q", q))
        returned = [c for c in calls if c.id is not None]
        bound = publish_timeout + 1.0 + 1.0 + (1.0 if on_index else 0.0)
        slow = [
            (c.payload, round(c.ended - c.began, 2)) for c in returned if c.ended - c.began > bound
        ]
        # Past relay_after (2 s), what a failed call left in the index is swept.
        await outbox_emptied(q, 20)
        problems: list[str] = []
        orders: list[tuple[Call, Call]] = []
        for d in devices:
            mine = [c for c in returned if c.device == d]
            want = {c.payload for c in mine}
            got = await take(q, d, want, 15)
            position = {x: at for at, (_, x) in enumerate(got)}
            if twice(got):
                problems.append(f"{d}: handed out twice {twice(got)}")
            lost = want - set(position)
            if lost:
                problems.append(f"{d}: returned, never handed out: {sorted(lost)}")
            for x in mine:
                for y in mine:
                    if x.ended < y.began and position.get(x.payload, -1) > position.get(
                        y.payload, 1 << 30
                    ):
                        orders.append((x, y))
                        problems.append(
                            f"{d}: {y.payload!r} (begun {y.began - x.ended:.3f} s after "
                            f"{x.payload!r} returned, in {x.ended - x.began:.2f} s) came first"
                        )
        print(
            f"{len(calls)} calls, {len(returned)} returned, "
            f"{sum(c.error is not None for c in calls)} failed; slowest "
            f"{max(c.ended - c.began for c in returned):.2f} s"
        )
        overtaken = {x.payload: x for x, _ in orders}.values()
        print("overtaken:", [(x.payload, x.began - t0, x.ended - x.began) for x in overtaken])
        assert not slow, f"returned past {bound} s: {slow[:5]}"
        assert not problems, problems[:5]


# -- 4. repeated confirms of one rollout while the first confirmer fails ----------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    ("backend", "how"),
    matrix([(b, h) for b in ALL for h in ("cancel", "close", "cut")], [("redis", "cut")]),
)
async def test_repeated_rollout_confirms_while_the_first_confirmer_fails(
    backend: str, how: str, tmp_path: Path
) -> None:
    """A rollout of 50 devices waits for confirmation. Store A (its broker link through a
    proxy) confirms it; its link stalls as A's write lands, so its publishes hang. Then A's
    confirm is cancelled, or A is closed, or its link is cut; meanwhile stores B and C each
    confirm the rollout three times at once. Every call ends within the bound; once the six
    returned, R enqueues ``later`` to each device: per device the rollout's command comes
    first, then ``later``, each once; everything ends DELIVERED and nothing stays queued."""
    rnd = seeded()
    async with rig(backend, tmp_path, index_link=False, broker_link=True) as r:
        sp = r.space
        link = r.link
        assert link is not None
        a = await open_faulted(r, publish_timeout=2.0, relay_after=2.0)
        b = await sp.open(publish_timeout=2.0, relay_after=2.0)
        c = await sp.open(publish_timeout=2.0, relay_after=2.0)
        reader = await sp.open(publish_timeout=2.0, relay_after=2.0)
        devices = [sp.device() for _ in range(50)]
        rollout = await reader.enqueue_many(
            devices, b"first", LONG, command_type="fw", requires_confirmation=True
        )
        rid = rollout.rollout_id
        link.stall()
        first = asyncio.ensure_future(a.confirm_rollout(rid))
        async with asyncio.timeout(10):
            while (await reader.rollout_summary(rid)).counts.get(WAITING):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await asyncio.sleep(rnd.uniform(0.0, 0.2))
        repeats = [asyncio.ensure_future(s.confirm_rollout(rid)) for s in (b, c) for _ in range(3)]
        await asyncio.sleep(rnd.uniform(0.0, 0.5))
        if how == "cancel":
            first.cancel()
        elif how == "close":
            closing = asyncio.ensure_future(a.close())
        else:
            await link.cut()
        began = time.monotonic()
        confirmed = []
        for t in repeats:
            failed = await ends(t)
            assert failed is None, f"a repeated confirm failed: {failed!r}"
            confirmed.append(t.result())
        print(f"B and C confirmed {confirmed} in {time.monotonic() - began:.2f} s")
        for d in devices:
            await reader.enqueue(d, b"later", LONG)
        link.resume()
        await link.restore()
        if how == "cancel":
            with suppress(asyncio.CancelledError):
                await ends(first)
        else:
            print(f"A's confirm: {await ends(first)!r}")
        if how == "close":
            await ends(closing)
        problems: list[str] = []
        for d in devices:
            got = await take(reader, d, {b"first", b"later"}, 10)
            if [x for _, x in got] != [b"first", b"later"]:
                problems.append(f"{d}: {[x for _, x in got]}")
        assert not problems, f"{len(problems)} of 50 devices: {problems[:5]}"
        # Real time on purpose: late copies (A's stalled publishes, its relay's) reach the
        # queues; no event marks a copy that may never come, so the drains below get a window.
        await asyncio.sleep(2.5)
        for d in devices[:10]:
            assert await reader.drain_pending(d) == []
        assert await statuses(reader, list(rollout.command_ids)) == {DELIVERED: len(devices)}


# -- 5. one shared mark commit carries many streams' windows ---------------------------------

# Found by this round and by a review (fixed): MarkCommits (mark_commits.py) joins up to 64
# streams' batches, each up to a prefetch window (1,000 by default), into ONE mark_delivered
# call; on PostgreSQL that was one statement with a bind parameter per id, and asyncpg refuses
# more than 32,767. The SQL index now marks 5,000 ids per statement.


@pytest.mark.parametrize(
    "backend",
    matrix(
        ["postgres", "sqlite", "redis"],
        ["postgres"],
    ),
)
async def test_one_mark_commit_of_full_windows_of_64_streams(backend: str, tmp_path: Path) -> None:
    """What a store's shared mark commit may hand its index at once: the batches of 64
    streams (``_STREAMS_PER_COMMIT``), each a full prefetch window of the default 1,000
    commands finished while the previous commit ran (a fleet online through one gateway
    after an outage, its index slow). The index takes it (none of these ids is open: 0
    marked) rather than failing every stream of the commit with a StateError."""
    async with space_on(backend, tmp_path) as sp:
        store = await sp.open()
        ids = [str(uuid.uuid4()) for _ in range(64 * store.config.prefetch)]
        began = time.monotonic()
        assert await asyncio.wait_for(store.state.mark_delivered(ids), BOUND) == 0
        print(f"{len(ids)} ids in one mark: {time.monotonic() - began:.2f} s")
