"""Seventh adversarial round: operator calls racing delivery, public API only, every index.

Confirm, cancel, latest-wins, rollouts, cleanup and outcome reports run against ``consume``
streams and drains of the same devices, from one store and from two stores sharing one
index (as two processes would). No broker, network or index fault is injected, nothing is
killed and no loop body raises: whatever a test finds, the contract promises it cannot
happen (a repeat, a loss, a stale hand-out, a status that lies).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import CommandStatus, QueueError, RabbitMQStore
from tests.rabbitmq_support import queue_depth
from tests.support import matrix
from tests.test_adversarial_seams import BACKENDS, Env, env_on

pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]
LONG = 600.0
BUSY = 0.0
"""Seconds the busy loop blocks per turn: 0 (it only yields) already shows the stale hand-out."""


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    async with env_on(request.param, tmp_path, prefix="adv7.") as shared:
        yield shared


# -- confirm twice, from two stores ------------------------------------------------------------


async def test_two_operators_confirming_at_once_publish_the_command_once(env: Env) -> None:
    """Rule 4: confirming twice is harmless; "RabbitMQ delivery": without a fault each
    command is published exactly once. Two operators (two stores on one index) confirm the
    same command at the same moment: each store finds it ready and not yet marked published,
    and each publishes it."""
    a = await env.open()
    b = await env.open()
    device = env.device()
    twice: list[int] = []
    for _ in range(5):
        command = await a.enqueue_with_confirmation(device, "unlock", b"door", LONG)
        await asyncio.gather(a.confirm_command(command), b.confirm_command(command))
        await asyncio.sleep(0.3)
        depth = await queue_depth(a, device)
        twice.append(depth)
        assert await a.drain_pending(device) == [b"door"]
    assert twice == [1] * 5, f"messages in the queue after each double confirm: {twice}"


async def test_a_double_confirm_from_two_stores_reaches_the_device_twice(env: Env) -> None:
    """The consequence: the gateway's stream (prefetch 1) holds the first message while the
    device works on it; a drain of the same device (the device reconnecting through another
    gateway process) claims the second copy: the device gets the command twice, one id."""
    a = await env.open()
    b = await env.open()
    gateway = await env.open(prefetch=1)
    device = env.device()
    handed: list[str] = []
    for _ in range(5):
        command = await a.enqueue_with_confirmation(device, "unlock", b"door", LONG)
        await asyncio.gather(a.confirm_command(command), b.confirm_command(command))
        await asyncio.sleep(0.3)
        async with gateway.consume(device) as stream:
            async for received in stream:
                handed.append(received.id)
                # The device works on it; meanwhile another gateway process drains.
                handed.extend(record.id for record in await b.drain_commands(device))
                break
        handed.extend(record.id for record in await b.drain_commands(device))
    repeats = {i: n for i, n in Counter(handed).items() if n > 1}
    assert not repeats, f"handed out twice without any fault: {len(repeats)} of 5"


@pytest.fixture(params=["sqlite", "postgres"])
async def sql_env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    async with env_on(request.param, tmp_path, prefix="adv7.") as shared:
        yield shared


async def test_a_confirm_after_another_stores_confirm_returned_publishes_again(
    sql_env: Env,
) -> None:
    """Not even concurrent: operator A's confirm has returned (its publish confirmed by the
    broker) when operator B confirms the same command again. A's publish mark rides on A's
    next index write, so B still finds the command unpublished and publishes a second copy
    (Redis marks fast enough that it is rarely seen there; the concurrent test above shows
    it on Redis too)."""
    env = sql_env
    a = await env.open()
    b = await env.open()
    device = env.device()
    depths: list[int] = []
    for _ in range(30):
        command = await a.enqueue_with_confirmation(device, "unlock", b"door", LONG)
        await a.confirm_command(command)
        await b.confirm_command(command)
        await asyncio.sleep(0.1)
        depths.append(await queue_depth(a, device))
        assert await a.drain_pending(device) == [b"door"]
    assert set(depths) == {1}, (
        f"messages queued after confirm(A) returned, then confirm(B): {depths}"
    )


async def test_two_concurrent_confirms_on_one_store_publish_once(env: Env) -> None:
    """Holds: within one store, a confirm that finds the command's publish in flight (or its
    mark not yet committed) does not publish it again."""
    a = await env.open()
    device = env.device()
    depths: list[int] = []
    for _ in range(5):
        command = await a.enqueue_with_confirmation(device, "unlock", b"door", LONG)
        await asyncio.gather(*(a.confirm_command(command) for _ in range(4)))
        await a.confirm_command(command)
        await asyncio.sleep(0.3)
        depths.append(await queue_depth(a, device))
        assert await a.drain_pending(device) == [b"door"]
    assert depths == [1] * 5


# -- operator calls racing a stream and drains, judged by call times ---------------------------


@dataclass
class Call:
    kind: str
    id: str
    start: float
    end: float
    ok: bool = True
    error: str = ""
    device: str = ""
    command_type: str | None = None
    payload: bytes = b""


@dataclass
class Taken:
    id: str
    payload: bytes
    asked: float
    """When the call that handed it out began (a drain's start, a stream's ``__anext__``)."""
    got: float
    reader: str


@dataclass
class Ledger:
    calls: list[Call] = field(default_factory=list)
    taken: list[Taken] = field(default_factory=list)
    unclear: list[str] = field(default_factory=list)

    async def call(self, kind: str, coro: Any, **info: Any) -> Call:
        start = time.monotonic()
        record = Call(kind, info.pop("id", ""), start, start, **info)
        try:
            result = await coro
        except QueueError as exc:
            record.ok, record.error = False, type(exc).__name__
        except Exception as exc:  # outside the hierarchy: a defect of its own
            record.ok, record.error = False, repr(exc)
            self.unclear.append(f"{kind}: {exc!r}")
        else:
            if isinstance(result, str) and not record.id:
                record.id = result
        record.end = time.monotonic()
        self.calls.append(record)
        return record


def judge(ledger: Ledger, finals: dict[str, CommandStatus]) -> list[str]:
    """Everything the contract forbids, as readable lines."""
    faults: list[str] = [f"unclear error {u}" for u in ledger.unclear]
    counts = Counter(t.id for t in ledger.taken)
    faults += [f"handed out {n} times: {i}" for i, n in counts.items() if n > 1]
    by_id = {c.id: c for c in ledger.calls if c.kind.startswith("enqueue") and c.ok}
    first_asked: dict[str, float] = {}
    for t in ledger.taken:
        first_asked.setdefault(t.id, t.asked)
    for c in ledger.calls:
        if not c.ok or c.id not in first_asked:
            continue
        if c.kind == "cancel" and first_asked[c.id] > c.end:
            faults.append(
                f"cancelled (returned {c.end:.4f}) then handed out "
                f"({first_asked[c.id]:.4f}): {c.id}"
            )
        first_got = min(t.got for t in ledger.taken if t.id == c.id)
        if c.kind == "confirm" and first_got < c.start:
            enq = by_id.get(c.id)
            t = next(t for t in ledger.taken if t.id == c.id)
            faults.append(
                f"handed out before its confirm began: {c.id} {t} confirm {c.start:.4f}-"
                f"{c.end:.4f} enqueued {enq}"
            )
    # Latest wins: a replacement that returned before the reader asked.
    replaced_at: dict[str, float] = {}
    slots: dict[tuple[str, str], list[Call]] = {}
    for c in sorted(by_id.values(), key=lambda c: c.start):
        if c.command_type is not None:
            slots.setdefault((c.device, c.command_type), []).append(c)
    for series in slots.values():
        for older, newer in itertools.pairwise(series):
            if newer.start > older.end:  # not concurrent: newer began after older returned
                replaced_at[older.id] = newer.end
    for i, asked in first_asked.items():
        if (
            i in replaced_at
            and asked > replaced_at[i]
            and finals.get(i) is not CommandStatus.DELIVERED
        ):
            faults.append(f"replaced, then handed out, and status {finals.get(i)}: {i}")
    # Statuses at the end, everything drained.
    delivered_like = {
        CommandStatus.DELIVERED,
        CommandStatus.SUCCEEDED,
        CommandStatus.FAILED,
        CommandStatus.TIMED_OUT,
    }
    for i in by_id:
        status = finals[i]
        if i in counts and status not in delivered_like:
            faults.append(f"handed out but status {status}: {i}")
        if i not in counts and status in delivered_like:
            faults.append(f"status {status} but never handed out: {i}")
        if i not in counts and status is CommandStatus.PENDING:
            faults.append(f"lost (PENDING, never handed out): {i}")
    # Ready order of one producer's plain commands, per reader call.
    for reader in {t.reader for t in ledger.taken}:
        plain = [t for t in ledger.taken if t.reader == reader and t.payload.startswith(b"p:")]
        numbers = [int(t.payload.split(b":")[1]) for t in plain]
        if numbers != sorted(numbers):
            faults.append(f"out of order in {reader}: {numbers}")
    return faults


async def _stream_reader(
    store: RabbitMQStore,
    device: str,
    ledger: Ledger,
    stop: asyncio.Event,
    name: str,
    report: bool = False,
) -> None:
    while not stop.is_set():
        async with store.consume(device) as stream:
            iterator = stream.__aiter__()
            while not stop.is_set():
                asked = time.monotonic()
                try:
                    command = await asyncio.wait_for(iterator.__anext__(), 0.5)
                except TimeoutError:
                    break  # a fresh stream now and then: closes requeue what it prefetched
                except StopAsyncIteration:
                    return
                ledger.taken.append(
                    Taken(command.id, command.payload, asked, time.monotonic(), name)
                )
                await asyncio.sleep(random.uniform(0, 0.01))  # the device works on it
                if report and random.random() < 0.3:
                    await ledger.call("complete", command.complete(b"ok"), id=command.id)


async def _drain_reader(
    store: RabbitMQStore, device: str, ledger: Ledger, stop: asyncio.Event, name: str
) -> None:
    n = 0
    while not stop.is_set():
        asked = time.monotonic()
        try:
            records = await store.drain_commands(device)
        except QueueError as exc:
            ledger.unclear.append(f"drain failed: {exc!r}")  # no fault was injected
            records = []
        n += 1
        for record in records:
            ledger.taken.append(
                Taken(record.id, record.payload, asked, time.monotonic(), f"{name}#{n}")
            )
        await asyncio.sleep(random.uniform(0, 0.03))


async def _operator(
    producer: RabbitMQStore,
    other: RabbitMQStore,
    devices: list[str],
    ledger: Ledger,
    seconds: float,
    rng: random.Random,
) -> None:
    """One producer per device (calls one at a time), operators on either store."""
    counter = {d: 0 for d in devices}
    awaiting: list[str] = []
    open_ids: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        device = rng.choice(devices)
        op = rng.random()
        if op < 0.35:
            counter[device] += 1
            payload = f"p:{counter[device]:05d}".encode()
            c = await ledger.call(
                "enqueue", producer.enqueue(device, payload, LONG), device=device, payload=payload
            )
            open_ids.append(c.id)
        elif op < 0.55:
            kind = rng.choice(["sp", "mode"])
            payload = f"{kind}:{time.monotonic():.6f}".encode()
            store = rng.choice([producer, other])
            c = await ledger.call(
                "enqueue_or_update",
                store.enqueue_or_update(device, kind, payload, LONG),
                device=device,
                command_type=kind,
                payload=payload,
            )
            open_ids.append(c.id)
        elif op < 0.65:
            payload = f"cf:{time.monotonic():.6f}".encode()
            c = await ledger.call(
                "enqueue_with_confirmation",
                producer.enqueue_with_confirmation(device, "cf", payload, LONG),
                device=device,
                command_type="cf",
                payload=payload,
            )
            if c.ok:
                awaiting.append(c.id)
        elif op < 0.75 and awaiting:
            target = awaiting.pop(rng.randrange(len(awaiting)))
            store = rng.choice([producer, other])
            await ledger.call("confirm", store.confirm_command(target), id=target)
        elif op < 0.88 and open_ids:
            # The latest ones mostly: older ones are delivered by now.
            target = open_ids.pop(max(0, len(open_ids) - 1 - int(rng.expovariate(1.0))))
            store = rng.choice([producer, other])
            await ledger.call("cancel", store.cancel_command(target), id=target)
        elif op < 0.93:
            await ledger.call("cleanup", rng.choice([producer, other]).cleanup())
        else:
            if open_ids:
                target = rng.choice(open_ids)
                await ledger.call("status", other.get_status(target), id=target)
            await ledger.call("pending", other.get_pending(device))
        await asyncio.sleep(rng.uniform(0, 0.004))
    # Confirm what is left, so nothing waits for ever.
    for target in awaiting:
        await ledger.call("confirm", producer.confirm_command(target), id=target)


@pytest.mark.parametrize("env", matrix(BACKENDS, ["redis"]), indirect=True)
async def test_operator_calls_racing_a_stream_and_drains_on_two_stores(env: Env) -> None:
    """Store A produces and operates, store B operates too and drains both devices, store C
    (prefetch 5) runs a stream per device, reopened now and then; device 1 is drained and
    consumed at once. Judged by call times: nothing twice, nothing cancelled or replaced before
    the reader asked, nothing before its confirm, ready order per reader, no lost command, and
    final statuses that agree with what was handed out."""
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    a = await env.open()
    b = await env.open()
    c = await env.open(prefetch=5)
    devices = [env.device(), env.device()]
    ledger = Ledger()
    stop = asyncio.Event()
    readers = [
        asyncio.create_task(_stream_reader(c, devices[0], ledger, stop, "streamC0", report=True)),
        asyncio.create_task(_stream_reader(c, devices[1], ledger, stop, "streamC1")),
        asyncio.create_task(_drain_reader(b, devices[1], ledger, stop, "drainB1")),
        asyncio.create_task(_drain_reader(a, devices[1], ledger, stop, "drainA1")),
    ]
    async with asyncio.timeout(50):
        await _operator(a, b, devices, ledger, 8.0, rng)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*readers)
        for device in devices:
            for n in range(3):
                asked = time.monotonic()
                for record in await b.drain_commands(device):
                    ledger.taken.append(
                        Taken(record.id, record.payload, asked, time.monotonic(), f"final{n}")
                    )
                await asyncio.sleep(0.3)
        ids = [c.id for c in ledger.calls if c.kind.startswith("enqueue") and c.ok]
        finals = {i: await b.get_status(i) for i in ids}
    faults = judge(ledger, finals)
    kinds = Counter((c.kind, c.ok) for c in ledger.calls)
    print(kinds, len(ledger.taken))
    assert len(ledger.taken) > 100
    assert not faults, "\n".join(faults[:30])


# -- the front of a stream's window expiring while its liveness is read -------------------------


async def _busy_loop(stop: asyncio.Event) -> None:
    """Other work of a busy gateway process: the event loop comes back late to every task."""
    while not stop.is_set():
        time.sleep(BUSY)  # noqa: ASYNC251 - the point: a loop that is slow to come back
        await asyncio.sleep(0)


# PostgreSQL in the short form: its liveness read is a round trip, the gap the test opens.
@pytest.mark.parametrize("env", matrix(BACKENDS, ["postgres"]), indirect=True)
async def test_a_command_cancelled_before_the_device_asked_is_not_handed_out_behind_an_expiring_one(
    env: Env,
) -> None:
    """A stream's window holds H (in hand), A (about to expire) and B. B is cancelled (the
    call returns) while the device works on H; then the device asks for the next command
    just as A's time runs out. ``__anext__`` reads A's liveness (live: not expired at the
    time it sent the read), then drops A as expired by its own clock, and hands out the next
    in the window, B, without asking the index about it: a cancelled command delivered after
    its cancel returned, before the device asked (rules 5 and "RabbitMQ delivery")."""
    store = await env.open()
    rng = random.Random()
    stale: list[str] = []
    tries = 0
    async with asyncio.timeout(45):
        for _ in range(25):
            tries += 1
            device = env.device()
            await store.enqueue(device, b"H", LONG)
            doomed = await store.enqueue(device, b"A", 0.4)
            cancelled = await store.enqueue(device, b"B", LONG)
            await store.enqueue(device, b"S", LONG)
            expires = {p.id: p.expires_at for p in await store.get_pending(device)}[doomed]
            async with store.consume(device) as stream:
                iterator = stream.__aiter__()
                first = await iterator.__anext__()
                assert first.payload == b"H"
                await store.cancel_command(cancelled)
                lead = rng.uniform(0.0, 0.012)
                wait = (expires - datetime.now(UTC)).total_seconds() - lead
                await asyncio.sleep(max(0.0, wait))
                stop = asyncio.Event()
                busy = asyncio.create_task(_busy_loop(stop))
                try:
                    second = await iterator.__anext__()
                finally:
                    stop.set()
                    await busy
                if second.id == cancelled:
                    stale.append(f"lead {lead * 1000:.1f} ms")
            if stale:
                break
    assert not stale, f"cancelled command handed out after {tries} tries: {stale}"


# -- latest wins from two stores at once, while the device drains -------------------------------


async def test_concurrent_replacements_from_two_stores_leave_one_open_and_only_the_winner_comes(
    env: Env,
) -> None:
    """Holds: 2 x 20 ``enqueue_or_update`` of one slot at once from two stores, a drain
    running between rounds: every call returns an id (no unique-index error escapes), at
    most one command of the slot is open after each round, and what a drain hands out after
    a round is that round's one open command."""
    a = await env.open()
    b = await env.open()
    device = env.device()
    handed: list[str] = []
    async with asyncio.timeout(40):
        for round_ in range(5):
            calls = [
                store.enqueue_or_update(device, "sp", f"{round_}:{n}".encode(), LONG)
                for n in range(20)
                for store in (a, b)
            ]
            ids = await asyncio.gather(*calls)
            pending = await a.get_pending(device)
            assert len(pending) == 1, f"round {round_}: {len(pending)} open of one slot"
            winner = pending[0].id
            assert winner in ids
            statuses = Counter([await a.get_status(i) for i in ids])
            assert statuses == {CommandStatus.PENDING: 1, CommandStatus.SUPERSEDED: 39}, statuses
            got: list[str] = []
            for _ in range(20):
                got += [record.id for record in await b.drain_commands(device)]
                if got:
                    break
                await asyncio.sleep(0.1)
            assert got == [winner], f"round {round_}: drained {got}, winner {winner}"
            handed += got
    assert len(set(handed)) == 5


# -- a store opened beside a busy one: its calls return before they are published ---------------


@pytest.mark.parametrize(
    ("env", "call"),
    matrix(
        [(kind, call) for kind in BACKENDS for call in ("confirm", "enqueue")],
        [("sqlite", "enqueue"), ("redis", "confirm")],
    ),
    indirect=["env"],
)
async def test_a_call_on_a_new_store_beside_a_busy_one_is_not_overtaken_by_a_later_enqueue(
    env: Env, call: str
) -> None:
    """Store A enqueues to a device flat out (one call at a time, numbered); the device's
    stream runs on store C. A new store B (an operator's process just started) confirms a
    command, or enqueues one, and its call RETURNS; only then does A enqueue its next
    commands. Rule 2 and "RabbitMQ delivery": without a fault, commands are published and
    handed out in ready order per device, and B's command became ready before A's next one
    was even enqueued. B's relay found A's publishes in flight when it started and holds B's
    command back behind them (owed, not published) until a later pass; A's next commands
    go straight to the queue ahead of it."""
    a = await env.open(relay_after=10.0, relay_interval=10.0)
    c = await env.open()
    device = env.device()
    late: list[str] = []
    async with asyncio.timeout(50):
        for attempt in range(3):
            held = await a.enqueue_with_confirmation(device, f"cf{attempt}", b"X", LONG)
            stop = asyncio.Event()
            after_return: list[str] = []
            returned = asyncio.Event()

            async def producer(
                stop: asyncio.Event, returned: asyncio.Event, after_return: list[str]
            ) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    began_after = returned.is_set()  # B's call had returned when this began
                    command = await a.enqueue(device, f"p:{n:05d}".encode(), LONG)
                    if began_after:
                        after_return.append(command)
                    await asyncio.sleep(0)

            task = asyncio.create_task(producer(stop, returned, after_return))
            await asyncio.sleep(0.2)
            b = await env.open(relay_after=10.0, relay_interval=10.0)
            if call == "confirm":
                target = held
                await b.confirm_command(held)
            else:
                target = await b.enqueue(device, b"X", LONG)
            returned.set()
            await asyncio.sleep(0.3)
            stop.set()
            await task
            if call == "enqueue":
                await a.confirm_command(held)  # delivered later: not judged
            order: list[str] = []
            async with c.consume(device) as stream:
                iterator = stream.__aiter__()
                while True:
                    try:
                        command = await asyncio.wait_for(iterator.__anext__(), 1.5)
                    except TimeoutError:
                        break
                    order.append(command.id)
            assert target in order, f"attempt {attempt}: {call}ed command never handed out"
            overtaken = [i for i in after_return if i in order[: order.index(target)]]
            if overtaken:
                late.append(f"attempt {attempt}: {len(overtaken)} later enqueues handed out first")
            await b.close()
    assert not late, late
