"""Adversarial seams: the public API of RabbitMQStore on every state backend over the real broker,
with its moving parts meeting each other (restarts mid-stream, stores sharing one state and one
exchange, close() during a stream or a drain, cancelled tasks, latest-wins racing consume,
confirm/cancel racing drain, TTL expiry racing delivery, cleanup running alongside).

Every scenario asserts the promise precisely: each accepted id handed out once (or, for
``consume`` whose body did not finish, again under the same id), in order per device, nothing
stale (cancelled, superseded, expired) handed out, and statuses that agree with what was handed
out. Only ``amqp_queue``'s public names are used; tests/ helpers only set up and tear down
(unique schemas, prefixes, exchanges).
"""

from __future__ import annotations

import asyncio
import gc
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from amqp_queue import (
    BrokerError,
    CommandNotFound,
    CommandStatus,
    RabbitMQConfig,
    RabbitMQStore,
)
from amqp_queue.state import DEFAULT_RETENTION
from tests.backends import POSTGRES_URL, REDIS_URL, postgres_schema, redis_prefix
from tests.rabbitmq_support import AMQP_URL, delete_namespace, queue_depth
from tests.support import unique

BACKENDS = ["sqlite", "postgres", "redis"]

# A scenario that hangs is abandoned on its own loop (run_isolated): what it leaks is reported
# by the garbage collector later, wherever that happens; that is not what these tests judge.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]
LONG = 600.0


@dataclass
class Env:
    """One state index and one exchange that several stores (as separate processes would) share."""

    state_url: str
    exchange: str
    devices: set[str] = field(default_factory=set)
    stores: list[RabbitMQStore] = field(default_factory=list)

    def device(self) -> str:
        name = unique("d")
        self.devices.add(name)
        return name

    async def open(
        self, *, retention: timedelta = DEFAULT_RETENTION, **config: Any
    ) -> RabbitMQStore:
        """A store on the shared index and exchange; ``config`` goes to RabbitMQConfig."""
        config.setdefault("relay_after", 1.0)
        config.setdefault("relay_interval", 1.0)
        store = await asyncio.wait_for(
            RabbitMQStore.connect(
                AMQP_URL,
                state_url=self.state_url,
                config=RabbitMQConfig(exchange=self.exchange, **config),
                retention=retention,
            ),
            15,
        )
        self.stores.append(store)
        return store


@asynccontextmanager
async def state_url_for(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    elif backend == "postgres":
        async with postgres_schema() as schema:
            url = make_url(POSTGRES_URL).update_query_dict({"schema": schema})
            yield url.render_as_string(hide_password=False)
    else:
        async with redis_prefix() as prefix:
            yield f"{REDIS_URL}?prefix={prefix}"


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    async with env_on(request.param, tmp_path) as shared:
        yield shared


def env_fixture(prefix: str) -> Any:
    """An ``env`` fixture over every backend (see :func:`env_on`), its exchange named with
    ``prefix``: ``env = env_fixture("mine.")`` in a test module."""

    @pytest.fixture(params=BACKENDS, name="env")
    async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
        async with env_on(request.param, tmp_path, prefix=prefix) as shared:
            yield shared

    return env


@asynccontextmanager
async def env_on(backend: str, tmp_path: Path, prefix: str = "adv.") -> AsyncIterator[Env]:
    """One shared index on ``backend`` and one exchange; the stores opened on them are
    closed and the exchange's queues deleted afterwards."""
    async with state_url_for(backend, tmp_path) as url:
        shared = Env(state_url=url, exchange=unique(prefix))
        try:
            yield shared
        finally:
            for store in shared.stores:
                with suppress(Exception):
                    await asyncio.wait_for(store.close(), 10)
            await delete_namespace(shared.exchange, sorted(shared.devices))
            # What a scenario leaked is collected here, under this module's warning filters,
            # not in whichever later test the collector happens to run.
            gc.collect()


# -- helpers -----------------------------------------------------------------------------------


def _seeded() -> random.Random:
    """A random source whose seed pytest shows with a failure (captured output), to replay it."""
    seed = random.randrange(2**32)
    print(f"random seed: {seed}")
    return random.Random(seed)


@dataclass
class Handout:
    id: str
    payload: bytes
    at: datetime
    expires_at: datetime
    asked: datetime
    """When the loop asked for it: before the store's expiry check, which ``at`` follows by
    however long the event loop took to come back."""
    finished: bool = False


async def consume_until(
    store: RabbitMQStore,
    device: str,
    out: list[Handout],
    *,
    done: Callable[[], bool],
    body: Callable[[Handout], Awaitable[None]] | None = None,
    idle: float = 8.0,
) -> None:
    """Consumes ``device`` into ``out`` until ``done()`` (checked after each command) or no
    command came for ``idle`` seconds."""
    async with store.consume(device) as stream:
        iterator = stream.__aiter__()
        while not done():
            asked = datetime.now(UTC)
            try:
                command = await asyncio.wait_for(iterator.__anext__(), idle)
            except (StopAsyncIteration, TimeoutError):
                return
            handout = Handout(
                command.id, command.payload, datetime.now(UTC), command.expires_at, asked
            )
            out.append(handout)
            if body is not None:
                await body(handout)
            handout.finished = True


async def drain_until_empty(
    store: RabbitMQStore, device: str, rounds: int = 3, *, errors: list[str] | None = None
) -> list[bytes]:
    """Drains until ``rounds`` drains in a row came back empty and the index holds nothing
    pending for the device: a command given back to an outbox (a cancelled drain's, whose
    message it had acked) reaches the queue when that store's relay publishes it again, which
    may take longer than a few empty rounds. One that never does fails the test (timeout).
    With ``errors``, a drain failing on the broker (a channel open timing out on a busy
    machine: it claimed nothing) is noted there and counts as an empty round."""
    got: list[bytes] = []
    empty = 0
    async with asyncio.timeout(30):
        while empty < rounds or await store.get_pending(device):
            try:
                batch = await store.drain_pending(device)
            except BrokerError as exc:
                if errors is None:
                    raise
                errors.append(repr(exc))
                batch = []
            got.extend(batch)
            empty = 0 if batch else empty + 1
            if not batch:
                await asyncio.sleep(0.2)
    return got


async def drain_everything(store: RabbitMQStore, device: str) -> list[bytes]:
    """Drains until the index holds nothing pending for the device (within 15 s), then until
    its queue stays empty."""
    got: list[bytes] = []
    async with asyncio.timeout(15):
        while True:
            got.extend(await store.drain_pending(device))
            if not await store.get_pending(device):
                break
            await asyncio.sleep(0.2)
    got.extend(await drain_until_empty(store, device, rounds=2))
    return got


def numbered(i: int) -> bytes:
    return f"{i:05d}".encode()


def number(payload: bytes) -> int:
    return int(payload.split(b":")[-1])


def assert_once(ids: list[str]) -> None:
    twice = {i: n for i, n in Counter(ids).items() if n > 1}
    assert not twice, f"handed out more than once: {twice}"


def assert_ascending(payloads: list[bytes], what: str = "") -> None:
    numbers = [number(p) for p in payloads]
    assert numbers == sorted(numbers), f"out of order {what}: {numbers}"


async def statuses(store: RabbitMQStore, ids: list[str]) -> dict[str, CommandStatus]:
    return {i: await store.get_status(i) for i in ids}


# -- scenarios ---------------------------------------------------------------------------------


async def test_restart_mid_consume_hands_the_rest_to_the_next_store_once_in_order(env: Env) -> None:
    """Store A consumes part of a device's commands and is closed while its loop runs (a body
    in progress); store B, opened on the same state and exchange, takes the rest."""
    device = env.device()
    a = await env.open()
    ids = [await a.enqueue(device, numbered(i), LONG) for i in range(40)]
    out: list[Handout] = []

    async def slow(h: Handout) -> None:
        await asyncio.sleep(0.01)

    consuming = asyncio.create_task(
        consume_until(a, device, out, done=lambda: False, body=slow, idle=5)
    )
    async with asyncio.timeout(30):
        while len(out) < 15:  # noqa: ASYNC110 - the consume task appends, no event to wait on
            await asyncio.sleep(0.002)
    await asyncio.wait_for(a.close(), 10)
    await asyncio.wait_for(consuming, 10)
    first = len(out)
    b = await env.open()
    await asyncio.wait_for(
        consume_until(b, device, out, done=lambda: len({h.id for h in out}) >= 40, idle=5), 20
    )
    handed = [h.id for h in out]
    assert_once(handed)
    assert set(handed) == set(ids), f"lost: {set(ids) - set(handed)} (A took {first})"
    assert_ascending([h.payload for h in out])
    got = await statuses(b, ids)
    assert set(got.values()) == {CommandStatus.DELIVERED}, got


async def test_two_stores_sharing_state_consume_one_device_each_command_once(env: Env) -> None:
    """Two stores on one state and one exchange consume the same device while both enqueue to
    it (alternating, so the enqueue order is a total order)."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    n = 60
    outs: dict[str, list[Handout]] = {"a": [], "b": []}

    def total() -> int:
        return len({h.id for o in outs.values() for h in o})

    consumers = [
        asyncio.create_task(consume_until(s, device, outs[k], done=lambda: total() >= n, idle=4))
        for k, s in (("a", a), ("b", b))
    ]
    ids = []
    for i in range(n):
        ids.append(await (a if i % 2 else b).enqueue(device, numbered(i), LONG))
        if i % 7 == 0:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(*consumers), 20)
    handed = [h.id for o in outs.values() for h in o]
    assert_once(handed)
    assert set(handed) == set(ids)
    for key, o in outs.items():
        assert_ascending([h.payload for h in o], f"on consumer {key}")
    got = await statuses(a, ids)
    assert set(got.values()) == {CommandStatus.DELIVERED}


@pytest.mark.parametrize("delay", [0.005, 0.03])
async def test_close_during_a_drain_returns_a_prefix_and_the_next_store_gets_the_rest(
    env: Env, delay: float
) -> None:
    device = env.device()
    a = await env.open(prefetch=20)
    n = 150
    ids = [await a.enqueue(device, numbered(i), LONG) for i in range(n)]
    draining = asyncio.create_task(a.drain_pending(device))
    await asyncio.sleep(delay)
    await asyncio.wait_for(a.close(), 10)
    try:
        first = await asyncio.wait_for(draining, 10)
    except Exception as exc:  # a drain ended by close may raise; then it handed out nothing
        first = []
        print("drain raised", type(exc).__name__, exc)
    b = await env.open()
    rest = await drain_until_empty(b, device)
    everything = first + rest
    assert len(everything) == len(set(everything)), "a payload was handed out twice"
    assert everything == [numbered(i) for i in range(n)], (
        f"A drained {len(first)}, B {len(rest)}; lost or disordered"
    )
    got = await statuses(b, ids)
    assert set(got.values()) == {CommandStatus.DELIVERED}


async def test_cancelled_drains_on_two_stores_racing_an_enqueuer_lose_and_repeat_nothing(
    env: Env,
) -> None:
    """Two stores drain one device while one of them enqueues to it, and most drains are
    cancelled at a random moment: every command is handed out exactly once, in order within
    each drain. A command a cancelled drain gives back is either requeued or owed to its
    store's relay; one left open with no message and nobody owing it shows as a timeout of
    the last drain, with what the index and the queue hold."""
    device = env.device()
    a = await env.open(prefetch=10)
    b = await env.open(prefetch=10)
    n = 120
    ids: list[str] = []
    results: list[list[bytes]] = []
    errors: list[str] = []

    async def producer() -> None:
        for i in range(n):
            ids.append(await a.enqueue(device, numbered(i), LONG))
            if i % 10 == 0:
                await asyncio.sleep(0.005)

    rng = _seeded()
    producing = asyncio.create_task(producer())
    async with asyncio.timeout(30):
        while not producing.done() or rng.random() < 0.5:
            tasks = [asyncio.create_task(s.drain_pending(device)) for s in (a, b)]
            await asyncio.sleep(rng.uniform(0, 0.03))
            for t in tasks:
                if rng.random() < 0.6:
                    t.cancel()
            for t in tasks:
                try:
                    results.append(await t)
                except asyncio.CancelledError:
                    pass
                except BrokerError as exc:
                    # A drain that claimed nothing may fail (a slow broker's channel open
                    # timing out on a busy machine): its commands stay queued.
                    errors.append(repr(exc))
    await producing
    # The last drains run on a store that took the cancellations: one cancelled while its
    # consumer started used to stall its connection for every later channel.
    last = a
    try:
        results.append(await drain_until_empty(last, device, errors=errors))
    except TimeoutError:
        pending = [(p.id, p.payload) for p in await last.get_pending(device)]
        depth = await queue_depth(last, device)
        raise AssertionError(
            f"open with no drain getting them: {pending}; {depth} messages ready; {errors}"
        ) from None
    flat = [p for r in results for p in r]
    assert len(flat) == len(set(flat)), f"twice: {[p for p, c in Counter(flat).items() if c > 1]}"
    missing = sorted(set(numbered(i) for i in range(n)) - set(flat))
    if missing:
        got = await statuses(a, ids)
        by_payload = {numbered(i): cid for i, cid in enumerate(ids)}
        raise AssertionError(f"lost: { {p: got[by_payload[p]] for p in missing} }; {errors}")
    assert sorted(flat) == [numbered(i) for i in range(n)]
    for r in results:
        assert_ascending(r, "within one drain")
    got = await statuses(a, ids)
    assert set(got.values()) == {CommandStatus.DELIVERED}, Counter(got.values())


async def test_a_replacement_while_the_loop_body_runs_is_what_comes_next(env: Env) -> None:
    """Deterministic stale check: a latest-wins command already in the consumer's window is
    replaced while the loop body for the previous command runs; the old payload must not be
    handed out, the new one must."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    first = await a.enqueue(device, b"plain:0", LONG)
    old = await a.enqueue_or_update(device, "setpoint", b"sp:1", LONG)
    trailing = await a.enqueue(device, b"plain:2", LONG)
    out: list[Handout] = []
    new_id: list[str] = []

    async def body(h: Handout) -> None:
        if h.id == first:
            new_id.append(await b.enqueue_or_update(device, "setpoint", b"sp:3", LONG))

    await asyncio.wait_for(
        consume_until(a, device, out, done=lambda: len(out) >= 3, body=body, idle=4), 15
    )
    handed = [h.id for h in out]
    assert old not in handed, f"superseded command handed out: {[h.payload for h in out]}"
    assert handed == [first, trailing, new_id[0]], [h.payload for h in out]
    got = await statuses(a, [first, old, trailing, new_id[0]])
    assert got[old] == CommandStatus.SUPERSEDED
    assert got[new_id[0]] == CommandStatus.DELIVERED


async def test_latest_wins_racing_consume_never_goes_back_and_ends_with_the_latest(
    env: Env,
) -> None:
    """Two stores replace one command type as fast as they can (plus plain commands between),
    while a third consumes with a loop body that takes a moment."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    c = await env.open()
    n = 50
    written: list[tuple[str, bytes]] = []
    plain: list[str] = []
    out: list[Handout] = []
    finished = asyncio.Event()

    async def producer() -> None:
        for i in range(n):
            store = a if i % 2 else b
            written.append(
                (await store.enqueue_or_update(device, "sp", b"sp:%d" % i, LONG), b"sp:%d" % i)
            )
            if i % 5 == 0:
                plain.append(await store.enqueue(device, b"plain:%d" % i, LONG))
            await asyncio.sleep(random.uniform(0, 0.01))
        finished.set()

    async def body(h: Handout) -> None:
        await asyncio.sleep(random.uniform(0, 0.01))

    last = lambda: finished.is_set() and any(h.id == written[-1][0] for h in out)  # noqa: E731
    consuming = asyncio.create_task(consume_until(c, device, out, done=last, body=body, idle=5))
    await asyncio.wait_for(producer(), 20)
    await asyncio.wait_for(consuming, 20)
    handed = [h.id for h in out]
    assert_once(handed)
    sp = [number(h.payload) for h in out if h.payload.startswith(b"sp:")]
    assert sp == sorted(sp), f"an older setpoint after a newer one: {sp}"
    assert written[-1][0] in handed, "the latest setpoint never came"
    assert set(plain) <= set(handed), "a plain command was lost"
    plain_numbers = [number(h.payload) for h in out if h.payload.startswith(b"plain:")]
    assert plain_numbers == sorted(plain_numbers)
    got = await statuses(a, [i for i, _ in written] + plain)
    for cid, _ in written:
        expected = CommandStatus.DELIVERED if cid in handed else CommandStatus.SUPERSEDED
        assert got[cid] == expected, (cid, got[cid], cid in handed)


async def test_confirm_and_cancel_racing_drains_hand_out_only_confirmed_uncancelled(
    env: Env,
) -> None:
    device = env.device()
    a = await env.open()
    b = await env.open()
    n = 40
    ids = [await a.enqueue_with_confirmation(device, f"t{i}", numbered(i), LONG) for i in range(n)]
    rng = _seeded()
    to_cancel = set(rng.sample(ids, n // 2))
    confirmed: set[str] = set()
    cancelled: set[str] = set()
    cancel_refused: set[str] = set()
    drained: list[list[bytes]] = []
    stop = asyncio.Event()

    async def confirmer(store: RabbitMQStore, which: list[str]) -> None:
        for cid in which:
            try:
                await store.confirm_command(cid)
                confirmed.add(cid)
            except CommandNotFound:
                pass  # cancelled first
            await asyncio.sleep(rng.uniform(0, 0.005))

    async def canceller(store: RabbitMQStore) -> None:
        for cid in sorted(to_cancel, key=lambda _: rng.random()):
            try:
                await store.cancel_command(cid)
                cancelled.add(cid)
            except CommandNotFound:
                cancel_refused.add(cid)
            await asyncio.sleep(rng.uniform(0, 0.005))

    async def drainer(store: RabbitMQStore) -> None:
        while not stop.is_set():
            drained.append(await store.drain_pending(device))
            await asyncio.sleep(0.005)

    drainers = [asyncio.create_task(drainer(s)) for s in (a, b)]
    await asyncio.wait_for(
        asyncio.gather(confirmer(a, ids[::2]), confirmer(b, ids[1::2]), canceller(b)), 20
    )
    stop.set()
    await asyncio.wait_for(asyncio.gather(*drainers), 20)
    drained.append(await drain_until_empty(a, device))
    flat = [p for d in drained for p in d]
    by_payload = {numbered(i): cid for i, cid in enumerate(ids)}
    handed = [by_payload[p] for p in flat]
    assert_once(handed)
    assert not set(handed) & cancelled, "a cancelled command was handed out"
    assert set(handed) <= confirmed, "an unconfirmed command was handed out"
    assert cancel_refused <= set(handed), "a cancel was refused for an undelivered command"
    assert set(handed) == confirmed - cancelled, f"lost: {confirmed - cancelled - set(handed)}"
    got = await statuses(a, ids)
    for cid in ids:
        if cid in handed:
            assert got[cid] == CommandStatus.DELIVERED
        elif cid in cancelled:
            assert got[cid] == CommandStatus.CANCELLED
        else:
            raise AssertionError(f"{cid} neither handed out nor cancelled: {got[cid]}")


async def test_ttl_expiry_racing_consume_and_concurrent_cleanups(env: Env) -> None:
    """Short- and long-lived commands interleaved; a slow consumer and two stores running
    cleanup in a loop. Nothing expired is handed out, every long one arrives once in order, the
    cleanups count each expiry once, and statuses agree."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    c = await env.open()
    rng = _seeded()
    short: list[str] = []
    long: list[str] = []
    for i in range(60):
        if i % 2:
            long.append(await a.enqueue(device, numbered(i), LONG))
        else:
            short.append(await a.enqueue(device, numbered(i), rng.uniform(0.3, 1.2)))
    counted: list[int] = []
    stop = asyncio.Event()

    async def cleaner(store: RabbitMQStore) -> None:
        while not stop.is_set():
            counted.append(await store.cleanup())
            await asyncio.sleep(rng.uniform(0, 0.05))

    cleaners = [asyncio.create_task(cleaner(s)) for s in (b, c)]
    await asyncio.sleep(0.35)
    out: list[Handout] = []

    async def body(h: Handout) -> None:
        await asyncio.sleep(0.03)

    long_set = set(long)
    await asyncio.wait_for(
        consume_until(
            b, device, out, done=lambda: long_set <= {h.id for h in out}, body=body, idle=5
        ),
        20,
    )
    await asyncio.sleep(1.3)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*cleaners), 10)
    counted.append(await a.cleanup())
    handed = [h.id for h in out]
    assert_once(handed)
    assert_ascending([h.payload for h in out])
    # Expired before the loop even asked: the store's check came later still.
    late = [(h.id, h.asked, h.expires_at) for h in out if h.asked >= h.expires_at]
    assert not late, f"expired commands handed out: {late}"
    got = await statuses(a, short + long)
    expired = [cid for cid in short if cid not in handed]
    for cid in long:
        assert got[cid] == CommandStatus.DELIVERED
    for cid in short:
        want = CommandStatus.DELIVERED if cid in handed else CommandStatus.EXPIRED
        assert got[cid] == want, (cid, got[cid])
    # A command that expired while the loop body had it ends DELIVERED (docs/delivery.md: "also
    # if ... an expiry came meanwhile: the device has it"), though a cleanup may have counted
    # it: the count may exceed the EXPIRED ones by those, never by more, and never fall short.
    in_hand = [h for h in out if h.expires_at <= h.at + timedelta(seconds=0.2)]
    assert len(expired) <= sum(counted) <= len(expired) + len(in_hand), (
        f"cleanups counted {sum(counted)}, expired {len(expired)}, expiring in hand {len(in_hand)}"
    )


async def test_consume_tasks_cancelled_mid_body_repeat_only_unfinished_and_keep_order(
    env: Env,
) -> None:
    device = env.device()
    a = await env.open()
    b = await env.open()
    n = 50
    ids = [await a.enqueue(device, numbered(i), LONG) for i in range(n)]
    out: list[Handout] = []
    rng = _seeded()

    async def body(h: Handout) -> None:
        await asyncio.sleep(rng.uniform(0, 0.02))

    def done() -> bool:
        return len({h.id for h in out if h.finished}) >= n

    async with asyncio.timeout(40):
        turn = 0
        while not done():
            store = (a, b)[turn % 2]
            turn += 1
            task = asyncio.create_task(consume_until(store, device, out, done=done, body=body))
            await asyncio.sleep(rng.uniform(0.01, 0.08))
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    finished_ids = [h.id for h in out if h.finished]
    assert_once(finished_ids)
    seen: set[str] = set()
    for index, h in enumerate(out):
        if h.id in seen:
            earlier = [e for e in out[:index] if e.id == h.id]
            assert not any(e.finished for e in earlier), (
                f"{h.id} came again after its body finished"
            )
        seen.add(h.id)
    firsts: list[bytes] = []
    for h in out:
        if h.payload not in firsts:
            firsts.append(h.payload)
    assert_ascending(firsts, "first hand-outs")
    assert set(finished_ids) == set(ids)
    # The device's order: after a repeat, nothing later may have been handed out before it
    # except what the cancelled consumer already held.
    got = await statuses(a, ids)
    assert set(got.values()) == {CommandStatus.DELIVERED}, Counter(got.values())


async def test_cancelled_enqueues_and_a_restart_deliver_every_accepted_command_once(
    env: Env,
) -> None:
    """Enqueues on several devices, a third of them cancelled at a random moment, and the store
    closed while calls are still in flight; a new store delivers everything the index took."""
    devices = [env.device() for _ in range(4)]
    a = await env.open()
    rng = _seeded()
    accepted: dict[str, list[int]] = {d: [] for d in devices}
    attempted: dict[str, list[int]] = {d: [] for d in devices}

    async def producer(device: str) -> None:
        for i in range(25):
            attempted[device].append(i)
            call = asyncio.create_task(a.enqueue(device, f"{device}:{i}".encode(), LONG))
            if rng.random() < 0.33:
                await asyncio.sleep(rng.uniform(0, 0.004))
                call.cancel()
            try:
                await call
                accepted[device].append(i)
            except asyncio.CancelledError:
                pass

    producers = [asyncio.create_task(producer(d)) for d in devices]
    await asyncio.sleep(0.15)
    await asyncio.wait_for(a.close(), 15)
    for p in producers:
        with suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(p, 10)
    b = await env.open()
    for device in devices:
        got: list[bytes] = []
        async with asyncio.timeout(15):  # orphans wait relay_after (1 s) for B's relay
            while True:
                got.extend(await b.drain_pending(device))
                if not await b.get_pending(device):
                    break
                await asyncio.sleep(0.2)
        got.extend(await drain_until_empty(b, device, rounds=2))
        numbers = [number(p) for p in got]
        assert len(numbers) == len(set(numbers)), f"{device}: twice {numbers}"
        assert numbers == sorted(numbers), f"{device}: out of order {numbers}"
        assert set(accepted[device]) <= set(numbers), (
            f"{device}: accepted but lost {set(accepted[device]) - set(numbers)}"
        )
        assert set(numbers) <= set(attempted[device])
        assert await b.get_pending(device) == []


# -- close() racing a call that has just started ------------------------------------------------


def run_isolated(scenario: Callable[[], Awaitable[Any]], seconds: float) -> Any:
    """Runs ``scenario`` on its own event loop in a daemon thread and returns its result; a
    scenario that does not finish within ``seconds`` fails the test without hanging the
    session (a task that ignores its cancellation would hang the test's own loop at exit)."""
    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        async def runner() -> None:
            try:
                box["result"] = await scenario()
            except BaseException as exc:
                box["error"] = exc

        # asyncio.run closes its loop (and cancels what the scenario left running): a loop
        # left open is found by the garbage collector in a later test, whose unraisable
        # ResourceWarnings (the loop, its self-pipe sockets) then fail that test.
        asyncio.run(runner())

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if "error" in box:
        raise box["error"]
    if "result" not in box:
        pytest.fail(f"the scenario hung for {seconds} s", pytrace=False)
    return box["result"]


def test_a_consume_opened_just_before_close_ends_promptly_and_loses_nothing(env: Env) -> None:
    n = 40

    async def scenario() -> dict[str, Any]:
        device = env.device()
        a = await env.open()
        for i in range(n):
            await a.enqueue(device, numbered(i), LONG)
        out: list[Handout] = []
        consuming = asyncio.create_task(consume_until(a, device, out, done=lambda: False, idle=30))
        await asyncio.sleep(0)
        await asyncio.wait_for(a.close(), 10)
        done, _ = await asyncio.wait([consuming], timeout=5)
        report: dict[str, Any] = {"ended_after_close": bool(done)}
        if not done:
            consuming.cancel()
            done, _ = await asyncio.wait([consuming], timeout=5)
            report["ended_after_cancel"] = bool(done)
        elif consuming.exception() is not None:
            report["raised"] = repr(consuming.exception())
        b = await env.open()
        rest = await drain_until_empty(b, device)
        await b.close()
        report["handed"] = [h.payload for h in out if h.finished] + rest
        return report

    report = run_isolated(scenario, 45)
    assert report["handed"] == [numbered(i) for i in range(n)], report
    assert report["ended_after_close"], report


def test_an_enqueue_racing_close_is_either_refused_or_delivered_by_the_next_store(
    env: Env,
) -> None:
    async def scenario() -> dict[str, Any]:
        device = env.device()
        a = await env.open()
        await a.enqueue(device, b"x:0", LONG)
        calls = [asyncio.create_task(a.enqueue(device, b"x:%d" % i, LONG)) for i in range(1, 30)]
        await asyncio.sleep(0.002)
        await asyncio.wait_for(a.close(), 10)
        done, pending = await asyncio.wait(calls, timeout=10)
        accepted = [
            number(b"x:%d" % (i + 1))
            for i, c in enumerate(calls)
            if c in done and not c.cancelled() and c.exception() is None
        ]
        b = await env.open()
        got = await drain_everything(b, device)
        await b.close()
        return {"accepted": [0, *accepted], "got": [number(p) for p in got], "hung": len(pending)}

    report = run_isolated(scenario, 60)
    got = report["got"]
    assert report["hung"] == 0, report
    assert len(got) == len(set(got)), report
    assert got == sorted(got), report
    assert set(report["accepted"]) <= set(got), report


async def test_cancel_rollout_racing_consumers_on_two_stores(env: Env) -> None:
    devices = [env.device() for _ in range(8)]
    a = await env.open()
    b = await env.open()
    rollouts = []
    for r in range(3):
        rollouts.append(await a.enqueue_many(devices, b"r:%d" % r, LONG))
    outs: dict[str, list[Handout]] = {d: [] for d in devices}
    stop = asyncio.Event()

    consumers = [
        asyncio.create_task(
            consume_until(
                (a, b)[k % 2],
                d,
                outs[d],
                done=stop.is_set,
                body=lambda h: asyncio.sleep(0.02),
                idle=2,
            )
        )
        for k, d in enumerate(devices)
    ]
    await asyncio.sleep(0.03)
    cancelled_count = await b.cancel_rollout(rollouts[1].rollout_id)
    await asyncio.wait_for(asyncio.gather(*consumers), 20)
    every = [cid for r in rollouts for cid in r.command_ids]
    handed = [h.id for d in devices for h in outs[d]]
    assert_once(handed)
    for d in devices:
        assert_ascending([h.payload for h in outs[d]], f"on {d}")
    got = await statuses(a, every)
    for r, rollout in enumerate(rollouts):
        for cid in rollout.command_ids:
            if cid in handed:
                assert got[cid] == CommandStatus.DELIVERED, (r, cid, got[cid])
            else:
                assert r == 1, f"rollout {r}: {cid} not handed out ({got[cid]})"
                assert got[cid] == CommandStatus.CANCELLED, (cid, got[cid])
    cancelled = [cid for cid in rollouts[1].command_ids if got[cid] == CommandStatus.CANCELLED]
    # Rule 5: a command a stream had handed out when the rollout was cancelled (its body
    # running, or its delivery mark not committed yet) is counted as cancelled and ends
    # DELIVERED; one command of this rollout per device at the most.
    assert len(cancelled) <= cancelled_count <= len(cancelled) + len(devices)
    summary = await b.rollout_summary(rollouts[1].rollout_id)
    assert summary.total == len(devices)
    assert summary.counts.get(CommandStatus.CANCELLED, 0) == len(cancelled)


async def test_retire_device_racing_a_stream_and_an_enqueuer(env: Env) -> None:
    device = env.device()
    a = await env.open()
    b = await env.open()
    ids: list[str] = []
    out: list[Handout] = []
    for i in range(20):
        ids.append(await a.enqueue(device, numbered(i), LONG))

    async def producer() -> None:
        for i in range(20, 40):
            ids.append(await a.enqueue(device, numbered(i), LONG))
            await asyncio.sleep(0.003)

    consuming = asyncio.create_task(
        consume_until(
            b, device, out, done=lambda: False, body=lambda h: asyncio.sleep(0.005), idle=2
        )
    )
    producing = asyncio.create_task(producer())
    await asyncio.sleep(0.05)
    retired = await a.retire_device(device)
    await asyncio.wait_for(producing, 20)
    await asyncio.wait_for(consuming, 20)
    # What was enqueued after the retire is an ordinary command for a new queue.
    late = await drain_until_empty(a, device)
    handed = [h.id for h in out if h.finished]
    assert_once(handed)
    assert_ascending([h.payload for h in out if h.finished] + late)
    got = await statuses(a, ids)
    by_payload = {numbered(i): cid for i, cid in enumerate(ids)}
    late_ids = [by_payload[p] for p in late]
    assert not set(late_ids) & set(handed)
    cancelled = [cid for cid in ids if got[cid] == CommandStatus.CANCELLED]
    for cid in ids:
        if cid in handed or cid in late_ids:
            assert got[cid] == CommandStatus.DELIVERED, (cid, got[cid])
        else:
            assert got[cid] == CommandStatus.CANCELLED, (
                cid,
                got[cid],
                "neither handed nor cancelled",
            )
    pos = {cid: i for i, cid in enumerate(ids)}
    # Rule 5: a command the stream had handed out (its body running, or finished with its
    # delivery mark not committed yet: marks are written in batches) when the retire
    # cancelled it ends DELIVERED; retire_device counted it. Only those: the rest of what it
    # counted ends CANCELLED.
    assert len(cancelled) <= retired <= len(cancelled) + len(handed), (
        f"retire_device said {retired} cancelled, {len(cancelled)} are; handed out "
        f"{sorted(pos[c] for c in handed)}, cancelled {sorted(pos[c] for c in cancelled)}, "
        f"late {sorted(pos[c] for c in late_ids)}"
    )


async def test_confirming_while_the_command_is_replaced_never_lets_the_replacement_through(
    env: Env,
) -> None:
    """Rule 3: a replacement never inherits an approval. confirm_command(old) races
    enqueue_with_confirmation(new, same type) on two stores while a third consumes."""
    a = await env.open()
    b = await env.open()
    c = await env.open()
    rounds = 12
    devices = [env.device() for _ in range(rounds)]
    outs: dict[str, list[Handout]] = {d: [] for d in devices}
    facts = []
    for d in devices:
        old = await a.enqueue_with_confirmation(d, "unlock", b"old:0", LONG)
        confirm = asyncio.create_task(a.confirm_command(old))
        replace = asyncio.create_task(b.enqueue_with_confirmation(d, "unlock", b"new:1", LONG))
        confirm_result = await asyncio.gather(confirm, return_exceptions=True)
        new = await replace
        facts.append((d, old, new, confirm_result[0]))
    consumers = [
        asyncio.create_task(consume_until(c, d, outs[d], done=lambda: False, idle=1.5))
        for d in devices
    ]
    await asyncio.wait_for(asyncio.gather(*consumers), 20)
    for d, old, new, confirmed in facts:
        handed = [h.id for h in outs[d]]
        assert new not in handed, f"{d}: the unconfirmed replacement was handed out"
        status_new = await a.get_status(new)
        assert status_new == CommandStatus.AWAITING_CONFIRMATION, status_new
        status_old = await a.get_status(old)
        if old in handed:
            assert confirmed is None, f"{d}: old handed out though its confirm failed: {confirmed}"
            assert status_old == CommandStatus.DELIVERED
        else:
            assert status_old == CommandStatus.SUPERSEDED, (d, status_old, confirmed)


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.005, 0.01])
def test_close_during_a_drain_never_leaves_commands_delivered_that_nobody_got(
    env: Env, delay: float
) -> None:
    """close() at once (delay 0: before the drain's first broker round trip) or a few
    milliseconds into a drain of 150 commands. The drain returns what it claimed
    (docs/delivery.md, Closing) and ends within a few seconds (it used to hang on the closed
    connection, even cancelled); had it stuck and been cancelled, it would give its claims
    back. Either way a second store must then get every command nobody got, once, in order,
    and no command may be DELIVERED without having been handed out."""
    n = 150

    async def scenario() -> dict[str, Any]:
        device = env.device()
        a = await env.open(prefetch=20)
        ids = [await a.enqueue(device, numbered(i), LONG) for i in range(n)]
        draining = asyncio.create_task(a.drain_pending(device))
        await asyncio.sleep(delay)
        await asyncio.wait_for(a.close(), 10)
        done, _ = await asyncio.wait([draining], timeout=5)
        report: dict[str, Any] = {"ended_after_close": bool(done)}
        if not done:
            draining.cancel()
            done, _ = await asyncio.wait([draining], timeout=5)
            report["ended_after_cancel"] = bool(done)
        first: list[bytes] = []
        if done and not draining.cancelled() and draining.exception() is None:
            first = draining.result()
        elif done:
            report["drain_raised"] = (
                "CancelledError" if draining.cancelled() else repr(draining.exception())
            )
        b = await env.open()
        rest = await drain_until_empty(b, device)
        report["first"], report["rest"] = len(first), len(rest)
        report["handed"] = first + rest
        got = await statuses(b, ids)
        handed = set(first + rest)
        report["delivered_not_handed"] = [
            i
            for i, cid in enumerate(ids)
            if got[cid] == CommandStatus.DELIVERED and numbered(i) not in handed
        ]
        await b.close()
        return report

    report = run_isolated(scenario, 50)
    lost = report["delivered_not_handed"]
    assert not lost, (
        f"{len(lost)} commands DELIVERED that nobody got (first drain {report['first']}, "
        f"next store {report['rest']}, drain ended after close: {report['ended_after_close']}, "
        f"after cancel: {report.get('ended_after_cancel')}, the drain raised: "
        f"{report.get('drain_raised')})"
    )
    assert report["handed"] == [numbered(i) for i in range(n)]
    assert report["ended_after_close"], report


class _BodyFailed(Exception):
    pass


@pytest.mark.parametrize("how", ["replaced", "cancelled"])
async def test_a_command_whose_body_raised_and_was_then_replaced_or_cancelled_never_comes_again(
    env: Env, how: str
) -> None:
    """At-least-once covers a body that raised, but a repeat must still be live: replaced or
    cancelled after the failed attempt, the command is stale and must be dropped."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    target = await a.enqueue_or_update(device, "sp", b"sp:1", LONG)
    after = await a.enqueue(device, b"plain:2", LONG)
    replacement: list[str] = []
    first: list[Handout] = []

    async def fail_after_change(h: Handout) -> None:
        if how == "replaced":
            replacement.append(await b.enqueue_or_update(device, "sp", b"sp:3", LONG))
        else:
            await b.cancel_command(h.id)
        raise _BodyFailed

    with pytest.raises(_BodyFailed):
        await asyncio.wait_for(
            consume_until(a, device, first, done=lambda: False, body=fail_after_change, idle=4),
            15,
        )
    assert [h.id for h in first] == [target]
    expected = [after, *replacement]
    second: list[Handout] = []
    await asyncio.wait_for(
        consume_until(b, device, second, done=lambda: len(second) >= len(expected), idle=3), 15
    )
    with suppress(TimeoutError):
        # Nothing more may come (a stale repeat would come now).
        extra: list[Handout] = []
        await asyncio.wait_for(consume_until(a, device, extra, done=lambda: bool(extra), idle=1), 5)
        second.extend(extra)
    assert [h.id for h in second] == expected, [h.payload for h in second]
    status = await a.get_status(target)
    want = CommandStatus.SUPERSEDED if how == "replaced" else CommandStatus.CANCELLED
    assert status == want, status
