"""Fifteenth adversarial round: the INDEX link of one store stalled or its replies lost at the
moments earlier rounds stalled the broker (a repeated confirm, a write's answer, a fan-out
superseded or cancelled from another store while streams hold it in their windows), short
time-to-live commands meeting a stalled broker link, and a producer process SIGKILLed in the
middle of fan-outs over many devices while another store consumes them. Public API to act,
every index where the fault can exist (an index link is proxied for PostgreSQL and Redis
only), the real broker. Judged: every call ends with a result or a ``QueueError`` within a
bound, nothing accepted lost, nothing handed out twice, nothing cancelled, replaced or expired
before the device asked for it handed out, per device a call that returned before another
began handed out first, statuses true afterwards."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import CommandStatus, PendingCommand, QueueError, RabbitMQStore
from tests.child_scripts import start_script
from tests.rabbitmq_support import AMQP_URL, delete_namespace, outbox_emptied
from tests.support import FULL_MATRIX, matrix, seeded, unique
from tests.tcp_proxy import StallProxy
from tests.test_adversarial_fifth_wire import _urls
from tests.test_adversarial_ninth import LONG, Space, space_on, take

ALL = ["sqlite", "postgres", "redis"]
WIRED = ["postgres", "redis"]
DELIVERED = CommandStatus.DELIVERED
BOUND = 30.0  # seconds any one call may take before it counts as hung
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@dataclass
class Indexed:
    """A space whose stores may reach the index through a proxy (``proxied``)."""

    space: Space
    index: StallProxy
    proxied: str


@asynccontextmanager
async def indexed_space(backend: str, *, bound: float = 2.0) -> AsyncIterator[Indexed]:
    """One index (PostgreSQL or Redis) and one exchange; ``proxied`` reaches the index
    through a :class:`StallProxy`, each statement bounded by ``bound`` seconds."""
    target = 5432 if backend == "postgres" else 6379
    async with (
        StallProxy(target, max_connections=64) as index,
        _urls(backend, index.port) as (direct, proxied),
    ):
        option = "command_timeout" if backend == "postgres" else "socket_timeout"
        space = Space(direct, unique("adv15."))
        try:
            yield Indexed(space, index, f"{proxied}&{option}={bound}")
        finally:
            index.resume()
            for store in space.stores:
                with suppress(Exception):
                    await asyncio.wait_for(store.close(), 15)
            await delete_namespace(space.exchange, sorted(space.devices))


async def pending_of(store: RabbitMQStore, device: str) -> dict[bytes, PendingCommand]:
    return {c.payload: c for c in await store.get_pending(device)}


def twice(got: list[tuple[str, bytes]]) -> dict[str, int]:
    return {i: n for i, n in Counter(i for i, _ in got).items() if n > 1}


async def ends(task: asyncio.Future[Any], bound: float = BOUND) -> BaseException | None:
    """Waits for ``task`` within ``bound``; its error (a QueueError) or None. A hang or an
    error outside the library's fails the test."""
    try:
        await asyncio.wait_for(task, bound)
    except QueueError as exc:
        return exc
    except TimeoutError:
        pytest.fail(f"a call still running after {bound} s")
    return None


# -- 1. a repeated confirm while the first confirmer's index link stalls after its write ----


@pytest.mark.parametrize(
    ("backend", "how"),
    matrix(
        [(b, h) for b in WIRED for h in ("replies", "both")],
        [("redis", "replies")],
    ),
)
async def test_a_repeated_confirm_while_the_first_confirmers_index_link_stalls(
    backend: str, how: str
) -> None:
    """Store A confirms a command through a proxied index link that stalls (every byte held,
    or only the replies: its write lands, its answer does not come) a moment after A's
    confirm began, for 2.5 s. Store B confirms it again (direct link) and returns; C then
    enqueues the next command to the device. The confirmed one goes first, each once, both
    DELIVERED; A's confirm ends (result or QueueError) once the link is back; A's late
    publish, if any, is dropped at delivery."""
    rnd = seeded()
    async with indexed_space(backend) as ix:
        sp = ix.space
        a = await sp.open(state_url=ix.proxied, relay_after=1.0, publish_timeout=3.0)
        b = await sp.open(relay_after=1.0, publish_timeout=3.0)
        c = await sp.open(relay_after=1.0, publish_timeout=3.0)
        device = sp.device()
        await c.ensure_queue(device)
        door = await c.enqueue_with_confirmation(device, "unlock", b"door", LONG)
        first = asyncio.ensure_future(a.confirm_command(door))
        await asyncio.sleep(rnd.uniform(0.0, 0.015))
        ix.index.stall(replies_only=how == "replies")
        # The link comes back after 2.5 s whatever B does: held with A's next statement in
        # it, A's transaction keeps the command's row locked (as on a dead link, until the
        # server gives up on it), and B's confirm waits for that row.
        resuming = asyncio.get_running_loop().call_later(2.5, ix.index.resume)
        try:
            began = time.monotonic()
            await asyncio.wait_for(b.confirm_command(door), BOUND)
            print(f"B's confirm took {time.monotonic() - began:.2f} s")
            after = await c.enqueue(device, b"after", LONG)
            got = await take(c, device, {b"door", b"after"}, 15)
            await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - began)))
        finally:
            resuming.cancel()
            ix.index.resume()
        failed = await ends(first)
        print(f"A's confirm: {failed!r}")
        assert [p for _, p in got] == [b"door", b"after"], got
        assert [await c.get_status(i) for i in (door, after)] == [DELIVERED, DELIVERED]
        await asyncio.sleep(1.5)  # A's late copy, or its relay's, reaches the queue
        assert await c.drain_pending(device) == []
        assert await c.get_status(door) is DELIVERED


# -- 2. a write whose answer the index link lost -------------------------------------------


@pytest.mark.parametrize(
    ("backend", "kind"),
    matrix(
        [(b, k) for b in WIRED for k in ("plain", "update", "many", "confirm")],
        [("postgres", "many")],
    ),
)
async def test_a_write_whose_answer_the_index_lost_is_delivered_if_the_index_holds_it(
    backend: str, kind: str
) -> None:
    """Producer P (index through the proxy, statements bounded at 2 s) has a command on each
    device; then its index link holds the replies (the server runs what it gets) a moment
    after P's next call began: a plain enqueue, a latest-wins update of the first one's
    slot, a fan-out over three devices, or a confirm. The call ends (a QueueError within the
    bound); the link comes back; Q (direct) enqueues a last command to each device. Whatever
    the index holds as pending is handed out, once, the first command ahead of the others,
    Q's last command after P's; every command handed out reads DELIVERED, none left
    PENDING, none not handed out reads DELIVERED."""
    rnd = seeded()
    async with indexed_space(backend) as ix:
        sp = ix.space
        p = await sp.open(state_url=ix.proxied, relay_after=1.0, publish_timeout=3.0)
        q = await sp.open(relay_after=1.0, publish_timeout=3.0)
        devices = [sp.device() for _ in range(3)]
        ids: dict[bytes, str] = {}
        for d in devices:
            await p.ensure_queue(d)
        if kind == "confirm":
            ids[b"first"] = await p.enqueue_with_confirmation(devices[0], "op", b"first", LONG)
        elif kind == "update":
            ids[b"first"] = await p.enqueue_or_update(devices[0], "op", b"first", LONG)
        else:
            ids[b"first"] = await p.enqueue(devices[0], b"first", LONG)
        for d in devices[1:]:
            ids[f"first-{d}".encode()] = await p.enqueue(d, f"first-{d}".encode(), LONG)
        call: Coroutine[Any, Any, object]
        if kind == "plain":
            call = p.enqueue(devices[0], b"X", LONG)
        elif kind == "update":
            call = p.enqueue_or_update(devices[0], "op", b"X", LONG)
        elif kind == "many":
            call = p.enqueue_many(devices, b"X", LONG)
        else:
            call = p.confirm_command(ids[b"first"])
        task = asyncio.ensure_future(call)
        await asyncio.sleep(rnd.uniform(0.0, 0.01))
        ix.index.stall(replies_only=True)
        try:
            failed = await ends(task, 15)
        finally:
            ix.index.resume()
        print(f"P's {kind}: {failed!r}")
        for d in devices:
            await q.enqueue(d, b"last", LONG)
        await asyncio.sleep(1.5)  # the relay's grace for what P owes
        # What the index holds as pending now, before anything is read.
        pending = {
            d: [
                c.payload
                for c in await q.get_pending(d)
                if c.confirmed or not c.requires_confirmation
            ]
            for d in devices
        }
        print(pending)
        for d in devices:
            want = set(pending[d])
            got = await take(q, d, want, 15)
            assert not twice(got), f"{d}: handed out twice: {got}"
            payloads = [x for _, x in got]
            missing = want - set(payloads)
            assert not missing, f"{d}: pending in the index, never handed out: {missing}"
            # P's call did not return: X has no place in the order; "first" (returned
            # before everything) has, unless replaced or waiting for its confirmation.
            if kind not in ("update", "confirm") or d != devices[0]:
                assert payloads[0].startswith(b"first"), (d, payloads)
            assert b"last" in payloads, (d, payloads)
            for command_id, _ in got:
                assert await q.get_status(command_id) is DELIVERED
            left = [c for c in await q.get_pending(d) if c.confirmed or not c.requires_confirmation]
            assert left == []
        await asyncio.sleep(1.5)  # late copies (P's owed publishes) are dropped
        for d in devices:
            assert await q.drain_pending(d) == []


# -- 3. a fan-out superseded or cancelled while streams hold it, their index link stalled ---


@pytest.mark.parametrize(
    ("backend", "how"),
    matrix(
        [(b, h) for b in WIRED for h in ("supersede", "cancel", "supersede-replies")],
        [("postgres", "cancel")],
    ),
)
async def test_a_fan_out_replaced_while_streams_hold_it_and_their_index_stalls(
    backend: str, how: str
) -> None:
    """Gateway G (index through the proxy, statements bounded at 3 s) streams four devices;
    each loop body holds its first command while G's index link stalls (both ways, or the
    replies only: G's delivery marks land unanswered). Meanwhile store Q (direct) replaces
    the fan-out F1 waiting in the streams' windows with F2 (same command type), or cancels
    its rollout, then enqueues ``tail``; the link comes back a moment later and the bodies
    end. The next command each stream hands out is asked for after Q's call returned: F1
    must never come; F2 (if any) then ``tail``, each once; statuses true."""
    rnd = seeded()
    async with indexed_space(backend, bound=3.0) as ix:
        sp = ix.space
        g = await sp.open(state_url=ix.proxied, publish_timeout=3.0)
        q = await sp.open(publish_timeout=3.0)
        devices = [sp.device() for _ in range(4)]
        for d in devices:
            await q.ensure_queue(d)
            await q.enqueue(d, b"head", LONG)
        f1 = await q.enqueue_many(devices, b"F1", LONG, command_type="cfg")
        holding = [asyncio.Event() for _ in devices]
        release = asyncio.Event()
        replaced_at = 0.0
        got: dict[str, list[tuple[str, bytes, float]]] = {d: [] for d in devices}
        errors: list[BaseException] = []

        async def stream(n: int, d: str) -> None:
            try:
                async with g.consume(d) as commands:
                    asked = time.monotonic()
                    async for command in commands:
                        got[d].append((command.id, command.payload, asked))
                        if command.payload == b"head":
                            holding[n].set()
                            await release.wait()
                        if command.payload == b"tail":
                            break
                        asked = time.monotonic()
            except QueueError as exc:
                errors.append(exc)

        streams = [asyncio.ensure_future(stream(n, d)) for n, d in enumerate(devices)]
        await asyncio.wait_for(asyncio.gather(*(h.wait() for h in holding)), 15)
        await asyncio.sleep(0.2)  # F1 is in each stream's window by now
        ix.index.stall(replies_only=how.endswith("replies"))
        try:
            if how.startswith("supersede"):
                f2 = await q.enqueue_many(devices, b"F2", LONG, command_type="cfg")
            else:
                assert await q.cancel_rollout(f1.rollout_id) == len(devices)
            replaced_at = time.monotonic()
            for d in devices:
                await q.enqueue(d, b"tail", LONG)
            release.set()  # the streams ask for the next command on the stalled link
            await asyncio.sleep(rnd.uniform(0.1, 1.5))
        finally:
            ix.index.resume()
            release.set()
        for s in streams:
            await ends(s)
        assert not [e for e in errors if not isinstance(e, QueueError)], errors
        print({d: [x for _, x, _ in v] for d, v in got.items()}, errors)
        for d in devices:
            handed = got[d]
            stale = [(p, asked - replaced_at) for _, p, asked in handed if p == b"F1"]
            stale = [s for s in stale if s[1] > 0]
            assert not stale, f"{d}: F1 handed out after its replacement returned: {stale}"
        # Whatever a stream did not hand out (one that ended with a QueueError) a new reader
        # takes; F1 never.
        for d in devices:
            want = {b"tail"} | ({b"F2"} if how.startswith("supersede") else set())
            have = {x for _, x, _ in got[d]}
            if not want <= have:
                got[d].extend((i, x, time.monotonic()) for i, x in await take(q, d, want, 10))
            payloads = [x for _, x, _ in got[d]]
            assert b"F1" not in payloads, (d, payloads)
            after_head = [x for x in payloads if x != b"head"]
            assert after_head == sorted(want, key=[b"F2", b"tail"].index), (d, payloads)
            assert not twice([(i, x) for i, x, _ in got[d]]), (d, payloads)
            for command_id, _, _ in got[d]:
                assert await q.get_status(command_id) is DELIVERED
        assert {await q.get_status(i) for i in f1.command_ids} <= {
            CommandStatus.SUPERSEDED,
            CommandStatus.CANCELLED,
        }
        if how.startswith("supersede"):
            assert {await q.get_status(i) for i in f2.command_ids} == {DELIVERED}


# -- 4. short time-to-live commands and a stalled broker link ------------------------------


@pytest.mark.parametrize(
    ("backend", "side"),
    matrix(
        [(b, s) for b in ALL for s in ("consumer", "producer")],
        [("sqlite", "consumer")],
    ),
)
async def test_short_lived_commands_near_expiry_while_a_broker_link_stalls(
    backend: str, side: str, tmp_path: Path
) -> None:
    """A stream on gateway G holds its first command in its loop body; producer P enqueues
    commands living 1.0 to 2.0 s and long-lived ones, interleaved, to the same device, and
    either G's broker link (consumer) or P's (producer: its publishes wait) stalls for
    2.5 s. The body ends after the link is back, then the stream goes on; a drain on a
    third store follows. A command whose time ran out before the device asked for it is
    never handed out; the long-lived ones all come, once, in call order; the expired ones
    read EXPIRED and nothing stays pending."""
    rnd = seeded()
    async with (
        StallProxy(5672, max_connections=16) as proxy,
        space_on(backend, tmp_path) as sp,
    ):
        slow = f"{proxy.amqp_url}?reconnect_interval=0.2"
        g = await sp.open(slow if side == "consumer" else AMQP_URL, publish_timeout=5.0)
        p = await sp.open(slow if side == "producer" else AMQP_URL, publish_timeout=5.0)
        other = await sp.open(publish_timeout=5.0)
        device = sp.device()
        await other.ensure_queue(device)
        await p.ensure_queue(device)
        await p.enqueue(device, b"head", LONG)
        holding = asyncio.Event()
        release = asyncio.Event()
        got: list[tuple[str, bytes, datetime]] = []  # id, payload, when the device asked
        expires: dict[bytes, datetime] = {}
        long_order: list[bytes] = []

        async def stream() -> None:
            async with g.consume(device) as commands:
                asked = datetime.now(UTC)
                async for command in commands:
                    got.append((command.id, command.payload, asked))
                    if command.payload == b"head":
                        holding.set()
                        await release.wait()
                    if command.payload == b"end":
                        break
                    asked = datetime.now(UTC)

        reader = asyncio.ensure_future(stream())
        await asyncio.wait_for(holding.wait(), 15)
        proxy.stall()
        calls: list[asyncio.Future[str]] = []
        try:
            for n in range(12):
                if n % 2:
                    payload = f"long{n:02d}".encode()
                    long_order.append(payload)
                    ttl = LONG
                else:
                    payload = f"short{n:02d}".encode()
                    ttl = rnd.uniform(1.0, 2.0)
                calls.append(asyncio.ensure_future(p.enqueue(device, payload, ttl)))
                if side == "consumer":
                    await asyncio.wait_for(calls[-1], BOUND)  # one call after another
                # Its write is in the index (direct) even while its publish waits.
                async with asyncio.timeout(10):
                    while payload not in (pending := await pending_of(other, device)):  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                if n % 2 == 0:
                    expires[payload] = pending[payload].expires_at
            await asyncio.sleep(2.5)
        finally:
            proxy.resume()
        ids = [await asyncio.wait_for(c, BOUND) for c in calls]
        # Real time on purpose: the loop body ends a moment after the link is back, as the
        # scenario has it; nothing public marks the link being back.
        await asyncio.sleep(0.3)
        release.set()
        await other.enqueue(device, b"end", LONG)
        await ends(reader)
        drained = await other.drain_pending(device)
        print([x for _, x, _ in got], drained)
        stale = [
            (x, (asked - expires[x]).total_seconds())
            for _, x, asked in got
            if x in expires and asked > expires[x]
        ]
        assert not stale, f"expired before the device asked, handed out: {stale}"
        assert not [x for x in drained if x.startswith(b"short")], drained
        payloads = [x for _, x, _ in got] + drained
        longs = [x for x in payloads if x.startswith(b"long")]
        if side == "consumer":  # each call returned before the next began
            assert longs == long_order, payloads
        else:
            assert sorted(longs) == long_order, payloads
        assert not twice([(i, x) for i, x, _ in got])
        for n, command_id in enumerate(ids):
            status = await other.get_status(command_id)
            handed = any(command_id == i for i, _, _ in got)
            if n % 2:
                assert status is DELIVERED, (n, status)
            else:
                assert status is (DELIVERED if handed else CommandStatus.EXPIRED), (n, status)
        assert await other.get_pending(device) == []


# -- 5. a producer process SIGKILLed mid fan-out over many devices, another consuming -------

FAN_OUT_PRODUCER = """
import asyncio, json, sys, time
from amqp_queue import RabbitMQConfig, RabbitMQStore

async def main() -> None:
    amqp, state, exchange, count, prefix, kind = sys.argv[1:7]
    command_type = "cfg" if kind == "latest" else None
    devices = [f"{prefix}{n:04d}" for n in range(int(count))]
    store = await RabbitMQStore.connect(
        amqp, state_url=state,
        config=RabbitMQConfig(exchange=exchange, relay_after=1.0, relay_interval=0.5),
    )
    for d in devices:
        await store.ensure_queue(d)
    print(json.dumps({"ev": "ready"}), flush=True)
    n = 0
    while True:
        payload = f"F{n:04d}"
        print(json.dumps({"ev": "start", "payload": payload}), flush=True)
        rollout = await store.enqueue_many(devices, payload.encode(), 600,
                                           command_type=command_type)
        print(json.dumps({"ev": "done", "payload": payload, "end": time.monotonic(),
                          "ids": list(rollout.command_ids)}), flush=True)
        n += 1

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", matrix(ALL, ["postgres"]))
async def test_a_producer_killed_mid_fan_out_while_another_store_consumes(
    backend: str, tmp_path: Path
) -> None:
    """A child process runs fan-outs over many devices back to back (each ``enqueue_many``
    one atomic write) and is SIGKILLed at a random moment while the parent's gateway
    streams a sample of the devices and drains the others. A store started after the kill
    relays what the child left unpublished. Every fan-out that returned reaches every
    device, once, in fan-out order; the one cut short reaches all devices or none (the
    index holds it whole or not at all); nothing stays pending."""
    rnd = seeded()
    count = 200 if FULL_MATRIX else 30
    async with space_on(backend, tmp_path) as sp:
        prefix = unique("fk")
        devices = [f"{prefix}{n:04d}" for n in range(count)]
        sp.devices.update(devices)
        proc, events = await start_script(
            FAN_OUT_PRODUCER, AMQP_URL, sp.url, sp.exchange, str(count), prefix, "plain"
        )
        gateway = await sp.open(relay_after=1.0)
        watched = devices[:: max(1, count // 6)]
        got: dict[str, list[tuple[str, bytes]]] = {d: [] for d in devices}

        async def stream(d: str) -> None:
            async with gateway.consume(d) as commands:
                async for command in commands:
                    got[d].append((command.id, command.payload))
                    if command.payload == b"zend":
                        break

        streams = [asyncio.ensure_future(stream(d)) for d in watched]
        try:
            await asyncio.sleep(rnd.uniform(0.5, 2.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await proc.reader
        done = [e for e in events if e["ev"] == "done"]
        started = [e for e in events if e["ev"] == "start"]
        cut = started[-1]["payload"].encode() if len(started) > len(done) else None
        print(f"{len(done)} fan-outs returned, cut short: {cut!r}")
        relay = await sp.open(relay_after=1.0)
        # Past the writer's grace (relay_after), a relay publishes what the child left.
        await outbox_emptied(relay, 20)
        for d in devices:
            if d not in watched:
                got[d].extend((c.id, c.payload) for c in await gateway.drain_commands(d))
        # Real time on purpose: a window for late copies to reach the queues before the
        # second drains judge them (no event marks a copy that may never come).
        await asyncio.sleep(1.0)
        for d in devices:
            if d in watched:
                await relay.enqueue(d, b"zend", LONG)
            else:
                got[d].extend((c.id, c.payload) for c in await gateway.drain_commands(d))
        for s in streams:
            await ends(s)
        want = [e["payload"].encode() for e in done]
        cut_reached = {d for d in devices if cut is not None and cut in [x for _, x in got[d]]}
        problems: list[str] = []
        for n, d in enumerate(devices):
            payloads = [x for _, x in got[d]]
            if twice(got[d]):
                problems.append(f"{d}: handed out twice {twice(got[d])}")
            expected = list(want)
            if cut is not None and d in cut_reached:
                expected.append(cut)
            if d in watched:
                expected.append(b"zend")
            if payloads != expected:
                problems.append(f"{d}: {payloads} != {expected}")
            if (pending := await relay.get_pending(d)) != []:
                problems.append(f"{d}: still pending {[c.payload for c in pending]}")
            for e in done:
                if (e["ids"][n], e["payload"].encode()) not in got[d]:
                    problems.append(f"{d}: {e['payload']} not under the id its call returned")
        print(json.dumps({"returned": len(done), "cut_reached": len(cut_reached)}))
        assert cut_reached in (set(), set(devices)), (
            f"the cut fan-out reached {len(cut_reached)} of {count} devices"
        )
        assert not problems, problems[:5]


# -- 6. a call made right after a stalled link came back, before the relay's retry ----------

CALLS = ("enqueue", "confirm", "many")


def _stale_failing_cases() -> list[Any]:
    # Found by this round (fixed): OutboxRelay.failing stayed set from the pass that failed
    # while the link was stalled until a pass succeeded, and PublishPath.publish returned at
    # once while it was set. Seen on Redis through the index every time; elsewhere a race
    # (PostgreSQL 0 of 21 probes, its write slower than the relay's read; a broker stall
    # about half the time; a confirm 1 of 4 tries on Redis).
    every = [
        *((b, "index", c) for b in ("redis", "postgres") for c in CALLS),
        *((b, "broker", "enqueue") for b in ALL),
    ]
    return matrix(every, [("redis", "index", "enqueue")])


@pytest.mark.parametrize(("backend", "link", "call"), _stale_failing_cases())
async def test_a_call_right_after_a_stalled_link_came_back_is_not_overtaken(
    backend: str, link: str, call: str, tmp_path: Path
) -> None:
    """Store P's index link (or broker link) stalls for 2.5 s; P's enqueue meanwhile fails
    (or returns with its publish owed) and its relay's passes fail. The link comes back; P
    enqueues A (its write lands at once), and once that call returned store Q enqueues B to
    the same device. A must be handed out before B (three tries in the full matrix). A is a plain
    enqueue, a confirm of a command written before the stall, or a fan-out to the device
    and another."""
    for attempt in range(3 if FULL_MATRIX else 1):
        async with AsyncExitStack() as stack:
            if link == "index":
                ix = await stack.enter_async_context(indexed_space(backend, bound=1.0))
                sp, faulted = ix.space, ix.index
                p = await sp.open(state_url=ix.proxied, relay_after=1.0, publish_timeout=3.0)
            else:
                faulted = await stack.enter_async_context(StallProxy(5672, max_connections=16))
                (tmp_path / str(attempt)).mkdir()
                sp = await stack.enter_async_context(space_on(backend, tmp_path / str(attempt)))
                p = await sp.open(
                    f"{faulted.amqp_url}?reconnect_interval=0.2",
                    relay_after=1.0,
                    publish_timeout=1.0,
                )
            q = await sp.open(relay_after=1.0, publish_timeout=3.0)
            device = sp.device()
            await p.ensure_queue(device)
            await q.ensure_queue(device)
            await p.enqueue(device, b"first", LONG)
            if call == "confirm":
                door = await p.enqueue_with_confirmation(device, "op", b"A", LONG)
            faulted.stall()
            try:
                x = asyncio.ensure_future(p.enqueue(device, b"X", LONG))
                await ends(x, 10)
                await asyncio.sleep(1.5)
            finally:
                faulted.resume()
            began = time.monotonic()
            if call == "enqueue":
                a = await asyncio.wait_for(p.enqueue(device, b"A", LONG), BOUND)
            elif call == "confirm":
                await asyncio.wait_for(p.confirm_command(door), BOUND)
                a = door
            else:
                rollout = p.enqueue_many([device, sp.device()], b"A", LONG)
                a = (await asyncio.wait_for(rollout, BOUND)).command_ids[0]
            took = time.monotonic() - began
            b = await q.enqueue(device, b"B", LONG)
            got = await take(q, device, {b"A", b"B"}, 10)
            payloads = [x for _, x in got]
            print(f"try {attempt}: A took {took * 1000:.1f} ms; {payloads}")
            assert payloads.index(b"A") < payloads.index(b"B"), (
                f"B, begun after A's call returned ({took * 1000:.1f} ms), came first: {payloads}"
            )
            assert [await q.get_status(i) for i in (a, b)] == [DELIVERED, DELIVERED]


# -- 7. a delivery mark held up past the command's expiry and another store's sweep ---------


@pytest.mark.parametrize(
    ("backend", "how", "outcome"),
    matrix(
        [(b, h, o) for b in WIRED for h in ("both", "replies") for o in ("complete", "timeout")],
        [("redis", "both", "timeout")],
    ),
)
async def test_a_delivery_mark_held_past_expiry_and_another_stores_sweep(
    backend: str, how: str, outcome: str
) -> None:
    """Gateway G (index through the proxy, statements bounded at 3 s) hands out a command
    living 1.5 s (with an outcome timeout of 1 s, or none); G's index link stalls as the
    loop body ends, so its delivery mark waits. The command expires; store O's
    ``cleanup()`` runs. The link comes back (before the bound) and the mark lands. The
    device had the command: it reads DELIVERED, then SUCCEEDED once completed, or TIMED_OUT
    after the outcome timeout and a sweep; it is never handed out again (the stream, a
    drain), and the next command comes."""
    async with indexed_space(backend, bound=3.0) as ix:
        sp = ix.space
        g = await sp.open(state_url=ix.proxied, publish_timeout=3.0)
        o = await sp.open(publish_timeout=3.0)
        device = sp.device()
        await o.ensure_queue(device)
        began = time.monotonic()
        bound = 1.0 if outcome == "timeout" else None
        short = await o.enqueue(device, b"C", 1.5, outcome_timeout=bound)
        got: list[tuple[str, bytes]] = []
        first: list[Any] = []
        stalled = asyncio.Event()

        async def stream() -> None:
            async with g.consume(device) as commands:
                async for command in commands:
                    got.append((command.id, command.payload))
                    if command.payload == b"C":
                        first.append(command)
                        ix.index.stall(replies_only=how == "replies")
                        stalled.set()
                    if command.payload == b"after":
                        break

        reader = asyncio.ensure_future(stream())
        try:
            await asyncio.wait_for(stalled.wait(), 10)
            await asyncio.sleep(max(0.0, 1.8 - (time.monotonic() - began)))
            swept = await asyncio.wait_for(o.cleanup(), BOUND)
            mid = await o.get_status(short)
            print(f"cleanup: {swept}; meanwhile {mid}")
            await asyncio.sleep(0.5)
        finally:
            ix.index.resume()
        await o.enqueue(device, b"after", LONG)
        await ends(reader)
        assert [p for _, p in got] == [b"C", b"after"], got
        async with asyncio.timeout(10):
            while (await o.get_status(short)) not in (DELIVERED, CommandStatus.TIMED_OUT):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        if outcome == "complete":
            await asyncio.wait_for(first[0].complete(b"ok"), BOUND)
            want = CommandStatus.SUCCEEDED
        else:
            await asyncio.sleep(1.2)
            await o.cleanup()
            want = CommandStatus.TIMED_OUT
        assert await o.get_status(short) is want
        assert await o.drain_pending(device) == []
        assert await o.get_status(short) is want


@pytest.mark.parametrize("backend", matrix(ALL, ["sqlite"]))
async def test_a_producer_killed_mid_latest_wins_fan_outs_while_streams_read(
    backend: str, tmp_path: Path
) -> None:
    """As above with latest-wins fan-outs (one command type): each stream of a sample of
    the devices hands out versions in fan-out order, never one a fan-out that returned
    before the stream asked had replaced; after the kill and the relay, the last version
    the index holds (the cut fan-out's, if written) reaches every device, and nothing
    stays pending."""
    rnd = seeded()
    count = 120 if FULL_MATRIX else 24
    async with space_on(backend, tmp_path) as sp:
        prefix = unique("fl")
        devices = [f"{prefix}{n:04d}" for n in range(count)]
        sp.devices.update(devices)
        proc, events = await start_script(
            FAN_OUT_PRODUCER, AMQP_URL, sp.url, sp.exchange, str(count), prefix, "latest"
        )
        gateway = await sp.open(relay_after=1.0)
        watched = devices[:: count // 8]
        got: dict[str, list[tuple[str, bytes, float]]] = {d: [] for d in watched}

        async def stream(d: str) -> None:
            async with gateway.consume(d) as commands:
                asked = time.monotonic()
                async for command in commands:
                    got[d].append((command.id, command.payload, asked))
                    if command.payload == b"zend":
                        break
                    await asyncio.sleep(rnd.uniform(0, 0.05))  # the device works on it
                    asked = time.monotonic()

        streams = [asyncio.ensure_future(stream(d)) for d in watched]
        try:
            await asyncio.sleep(rnd.uniform(0.5, 2.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await proc.reader
        done = [e for e in events if e["ev"] == "done"]
        started = [e for e in events if e["ev"] == "start"]
        cut = started[-1]["payload"].encode() if len(started) > len(done) else None
        relay = await sp.open(relay_after=1.0)
        # Past the writer's grace (relay_after), a relay publishes what the child left.
        await outbox_emptied(relay, 20)
        last = {d: [c.payload for c in await relay.get_pending(d)] for d in watched}
        for d in watched:
            await relay.enqueue(d, b"zend", LONG)
        for s in streams:
            await ends(s)
        ended = {e["payload"].encode(): e["end"] for e in done}
        landed = cut is not None and any(
            cut in [*last[d], *(x for _, x, _ in got[d])] for d in watched
        )
        final = cut if landed else max(ended, default=None)
        problems: list[str] = []
        for d in watched:
            versions = [(x, asked) for _, x, asked in got[d] if x != b"zend"]
            payloads = [x for x, _ in versions]
            if payloads != sorted(set(payloads)):
                problems.append(f"{d}: out of order or twice: {payloads}")
            for x, asked in versions:
                newer = [y for y, end in ended.items() if y > x and end < asked]
                if newer:
                    problems.append(f"{d}: {x!r} handed out after {newer[0]!r} returned")
            if final is not None and (not payloads or payloads[-1] != final):
                problems.append(f"{d}: the last version {final!r} never came: {payloads}")
            if (pending := await relay.get_pending(d)) != []:
                problems.append(f"{d}: still pending {[c.payload for c in pending]}")
        print(f"{len(done)} fan-outs returned, cut {cut!r}, pending before the end: {last}")
        assert not problems, problems[:5]
