"""Thirteenth adversarial round: the operator HTTP API (``amqp-queue serve`` SIGKILLed and
started again, or in this process) beside library stores, and latest-wins fan-outs racing
cancels, retirement and cleanup. Public API only, every index. Judged: a 2xx answer's command
is handed out (unless a 2xx said cancelled or replaced, or it expired), never stale, never twice
in a reader, a call that returned before another began first; statuses true. Found (fixed): a
confirm answered 200 pending was overtaken by a later enqueue (the first test)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from amqp_queue import CommandStatus, QueueError, RabbitMQConfig, RabbitMQStore
from amqp_queue.service import Backends, running_api
from tests.api_support import TOKEN, settings_for
from tests.support import matrix, seeded
from tests.tcp_proxy import StallProxy
from tests.test_adversarial_ninth import space_on
from tests.test_adversarial_restarts_seventh import Sidecar

ALL = ["sqlite", "postgres", "redis"]
LONG = 600.0
DELIVERED = CommandStatus.DELIVERED
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@dataclass
class Op:  # one command as its callers saw it (monotonic times)
    payload: bytes
    device: str
    slot: str | None = None  # the command type of a latest-wins or confirmation command
    start: float = 0.0
    ready: tuple[float, float] | None = None  # the call that made it ready, answered 2xx
    id: str | None = None
    confirm_began: float | None = None
    needs_confirm: bool = False
    gone_at: float | None = None  # cancelled, replaced or retired: that call's 2xx
    maybe_gone: bool = False  # such a call whose answer was lost
    expires: float | None = None


class Hand(NamedTuple):
    reader: str
    id: str
    payload: bytes
    asked: float


@dataclass
class Book:
    ops: dict[bytes, Op] = field(default_factory=dict)
    hands: list[Hand] = field(default_factory=list)
    n: itertools.count[int] = field(default_factory=itertools.count)

    def new(self, device: str, tag: str, at: bytes = b"", **kw: Any) -> Op:
        payload = at or f"{tag}{next(self.n):05d}".encode()
        op = self.ops[payload] = Op(payload, device, start=time.monotonic(), **kw)
        return op

    def written(self, op: Op, command_id: str | None, *, ready: bool = True) -> None:
        now = time.monotonic()
        op.id = command_id
        if command_id is not None and ready:
            op.ready = (op.start, now)
        if op.slot is None:
            return
        for old in self.ops.values():  # a replacement ends the older one of its slot
            if (old.device, old.slot) == (op.device, op.slot) and old.start < op.start:
                if command_id is None:
                    old.maybe_gone = True
                elif old.gone_at is None:
                    old.gone_at = now

    def key(self, payload: bytes, device: str) -> bytes:
        return payload if payload in self.ops else payload + b"@" + device.encode()

    async def final(self, store: RabbitMQStore, devices: list[str], seconds: float) -> list[str]:
        """Drains what is left; then each status must agree with who got the command."""
        deadline, wrong = time.monotonic() + seconds, ["?"]
        while wrong and time.monotonic() < deadline:
            for d in devices:
                for r in await store.drain_commands(d):
                    key, now = self.key(r.payload, d), time.monotonic()
                    self.hands.append(Hand(f"final:{d}:{deadline - now:.1f}", r.id, key, now))
            got, wrong = {h.id for h in self.hands}, []
            for o in self.ops.values():
                if o.id is None:
                    continue
                st, took = await store.get_status(o.id), o.id in got
                if st is not DELIVERED if took else st in (DELIVERED, CommandStatus.PENDING):
                    wrong.append(f"{o.payload!r} {'got' if took else 'not got'} reads {st}")
            await asyncio.sleep(0.5 if wrong else 0)
        return wrong

    def owed(self) -> set[bytes]:
        ok = [p for p, o in self.ops.items() if o.ready and o.gone_at is None and not o.maybe_gone]
        return {p for p in ok if self.ops[p].expires is None}

    def problems(self) -> list[str]:
        out: list[str] = []
        for h in self.hands:
            o = self.ops[h.payload]
            if o.gone_at is not None and h.asked > o.gone_at:
                out.append(f"stale: {h.reader} got {h.payload!r} {h.asked - o.gone_at:.3f}s late")
            if o.needs_confirm and o.confirm_began is None:
                out.append(f"unconfirmed: {h.reader} got {h.payload!r}")
            if o.expires is not None and h.asked > o.expires + 0.05:
                out.append(f"expired: {h.reader} got {h.payload!r}")
        for reader in sorted({h.reader for h in self.hands}):
            mine = [h for h in self.hands if h.reader == reader]
            twice = Counter(h.id for h in mine)
            out += [f"twice in {reader}: {i}" for i, k in twice.items() if k > 1]
            seq = [self.ops[h.payload] for h in mine if self.ops[h.payload].ready]
            for i, a in enumerate(seq):
                out += [
                    f"out of order in {reader}: {a.payload!r} before {b.payload!r}"
                    for b in seq[i + 1 :]
                    if b.ready and a.ready and b.ready[1] < a.ready[0]
                ]
        lost = sorted(self.owed() - {h.payload for h in self.hands})
        return out + ([f"lost: {lost}"] if lost else [])


async def read(
    book: Book, store: RabbitMQStore, device: str, stop: asyncio.Event, *, drain: bool
) -> None:
    """A stream (opened again when retirement ends it) or a drain loop on ``device``."""
    calls = itertools.count()
    while not stop.is_set():
        try:
            if drain:
                asked = time.monotonic()
                name = f"drain:{device}:{next(calls)}"
                for r in await store.drain_commands(device):
                    book.hands.append(Hand(name, r.id, book.key(r.payload, device), asked))
                await asyncio.sleep(0.02)
                continue
            name = f"stream:{device}:{next(calls)}"
            async with store.consume(device) as commands:
                while not stop.is_set():
                    asked = time.monotonic()
                    try:
                        async with asyncio.timeout(0.3):
                            c = await anext(commands)
                    except TimeoutError:
                        continue
                    book.hands.append(Hand(name, c.id, book.key(c.payload, device), asked))
        except (QueueError, StopAsyncIteration):
            await asyncio.sleep(0.05)


async def reading(
    book: Book, s: RabbitMQStore, d: RabbitMQStore, devices: list[str], work: Awaitable[object]
) -> None:
    """A stream on ``s``, drains on ``d``, per device: during ``work``, then until all came."""
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(read(book, st, v, stop, drain=st is d))
        for st in (s, d)
        for v in devices
    ]
    try:
        await work
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not book.owed() <= {h.payload for h in book.hands}:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("backend", "how"),
    matrix([(b, h) for b in ALL for h in ("stalled", "busy")], [("sqlite", "stalled")]),
)
async def test_a_confirm_answered_pending_is_not_overtaken_by_a_later_enqueue(
    backend: str, how: str, tmp_path: Path
) -> None:
    """Found by round 13, fixed. Two operators approve one command. A's confirm commits
    first: A is a library store whose broker link is held 0.3 s ("stalled": 3 of 3 trials
    failed), or ``amqp-queue serve`` answering 24 clients that enqueue to other devices
    ("busy", no fault: 1-4 of 40 failed). B's ``POST /commands/{id}/confirm`` answers
    ``200 pending`` (nothing changed) and B's operator POSTs a plain command, which a classic
    queue's stream got first: B's confirm returned at once while A's publish was on its way.
    Rule 2 (ready at its confirmation): the approved command must come first."""
    rng, trials, orders = seeded(), 3 if how == "stalled" else 40, []
    async with StallProxy(5672, max_connections=8) as link, space_on(backend, tmp_path) as space:
        device, others = space.device(), [space.device() for _ in range(4)]
        path = f"/devices/{device}/commands"
        reader, a = await space.open(), await space.open(link.amqp_url)
        await asyncio.gather(reader.ensure_queue(device), a.ensure_queue(device))
        sidecar, stop = Sidecar(space.url, space.exchange), asyncio.Event()
        head = {"Authorization": f"Bearer {Sidecar.TOKEN}"}
        if how == "busy":
            await sidecar.start()

        async def load() -> None:
            async with httpx.AsyncClient(base_url=sidecar.url, headers=head, timeout=20) as c:
                while not stop.is_set():
                    body = {"payload": "l", "ttl": 30}
                    await c.post(f"/devices/{rng.choice(others)}/commands", json=body)

        loads = [asyncio.create_task(load()) for _ in range(24 if how == "busy" else 0)]
        cfg = RabbitMQConfig(exchange=space.exchange)
        settings = settings_for(tmp_path, state_url=space.url, rabbitmq=cfg)
        try:
            async with (
                await Backends.open(settings) as backends,
                running_api(backends) as url,
                httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as b,
                httpx.AsyncClient(base_url=sidecar.url or url, headers=head, timeout=20) as ha,
            ):
                for t in range(trials):
                    body = {"payload": f"C{t}", "ttl": LONG, "mode": "confirm", "command_type": "u"}
                    cid = (await b.post(path, json=body)).json()["id"]
                    if how == "stalled":
                        link.stall()
                    first = asyncio.create_task(
                        a.confirm_command(cid)
                        if how == "stalled"
                        else ha.post(f"/commands/{cid}/confirm")
                    )
                    async with asyncio.timeout(10):
                        while (await b.get(f"/commands/{cid}")).json()["confirmed"] is not True:  # noqa: ASYNC110
                            await asyncio.sleep(0)
                    second = await b.post(f"/commands/{cid}/confirm")
                    assert second.json()["status"] == "pending", second.text
                    body = {"payload": f"X{t}", "ttl": LONG}
                    assert (await b.post(path, json=body)).status_code == 201
                    await asyncio.sleep(0.3 if how == "stalled" else 0)
                    link.resume()
                    await asyncio.wait_for(first, 15)
                    got: list[bytes] = []
                    async with reader.consume(device) as commands, asyncio.timeout(5):
                        async for c in commands:
                            got.append(c.payload)
                            if len(got) == 2:
                                break
                    orders.append(got)
        finally:
            stop.set()
            await asyncio.gather(*loads, return_exceptions=True)
            if how == "busy":
                await sidecar.kill()
    bad = [o for t, o in enumerate(orders) if o != [f"C{t}".encode(), f"X{t}".encode()]]
    assert not bad, f"{len(bad)} of {trials}: the approved command after a later one: {bad}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", matrix(ALL, ["postgres"]))
async def test_http_modes_confirms_and_cancels_through_a_sidecar_kill(
    backend: str, tmp_path: Path
) -> None:
    """Per device a lane POSTs plain, latest-wins and confirm-mode commands through sidecar A
    or B (two ``amqp-queue serve`` on one index), confirms them (at times on both at once) or
    cancels them over HTTP; A is SIGKILLed and started again mid-run; a stream and drain
    loops on two library stores read."""
    rng, book = seeded(), Book()
    head = {"Authorization": f"Bearer {Sidecar.TOKEN}"}
    async with space_on(backend, tmp_path) as space:
        devices = [space.device() for _ in range(2)]
        streams, drains = await space.open(relay_after=5.0), await space.open(relay_after=5.0)
        cur = [Sidecar(space.url, space.exchange) for _ in range(2)]
        await asyncio.gather(*(s.start() for s in cur), *(streams.ensure_queue(d) for d in devices))
        slots = itertools.count()

        async def post(side: int, path: str, body: Any = None) -> httpx.Response | None:
            """The answer; None when it was lost; raises ConnectError when never sent."""
            async with httpx.AsyncClient(base_url=cur[side].url, headers=head, timeout=20) as c:
                try:
                    return await c.post(path, json=body or {})
                except httpx.HTTPError as exc:
                    if isinstance(exc, httpx.ConnectError):
                        raise
                    return None

        async def lane(device: str) -> None:
            end = time.monotonic() + 5
            while time.monotonic() < end:
                kind, side = rng.choices("PLC", [45, 20, 35])[0], rng.randrange(2)
                slot = {"P": None, "L": "sp", "C": rng.choice(["door", f"c{next(slots)}"])}[kind]
                op = book.new(device, kind, slot=slot, needs_confirm=kind == "C")
                mode = {"P": "plain", "L": "latest", "C": "confirm"}[kind]
                body = {"payload": op.payload.decode(), "ttl": LONG, "mode": mode}
                body |= {"command_type": slot} if slot else {}
                try:
                    res = await post(side, f"/devices/{device}/commands", body)
                except httpx.ConnectError:
                    res = httpx.Response(599)
                if res is not None and res.status_code != 201:
                    del book.ops[op.payload]
                    continue
                book.written(op, res.json()["id"] if res else None, ready=not op.needs_confirm)
                if op.id is None or rng.random() < 0.3:
                    continue
                t0, action = time.monotonic(), "cancel"
                if op.needs_confirm and rng.random() < 0.75:
                    action, op.confirm_began = "confirm", t0
                sides = [0, 1] if action == "confirm" and rng.random() < 0.25 else [side]
                with suppress(httpx.ConnectError):
                    answers = await asyncio.gather(
                        *(post(s, f"/commands/{op.id}/{action}") for s in sides)
                    )
                    ok = [a for a in answers if a is not None and a.status_code == 200]
                    if len(ok) < len(answers) and None in answers:
                        op.maybe_gone = op.maybe_gone or action == "cancel"
                    elif len(ok) == len(answers):
                        if action == "cancel":
                            op.gone_at = time.monotonic()
                        elif ok[0].json()["status"] == "pending":
                            op.ready = (t0, time.monotonic())

        async def killer() -> None:
            await asyncio.sleep(rng.uniform(1.5, 3.0))
            await cur[0].kill()
            await (fresh := Sidecar(space.url, space.exchange)).start()
            cur[0] = fresh

        try:
            work = asyncio.gather(killer(), *(lane(d) for d in devices))
            await reading(book, streams, drains, devices, work)
        finally:
            await asyncio.gather(*(s.kill() for s in cur))
        wrong = await book.final(drains, devices, 10)
    assert not book.problems(), book.problems()
    assert not wrong, f"statuses: {wrong}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", matrix(ALL, ["redis"]))
async def test_latest_wins_fan_outs_racing_cancels_retires_and_cleanups(
    backend: str, tmp_path: Path
) -> None:
    """Store P sends typed ``enqueue_many`` fan-outs (some living under a second) to subsets
    of four devices, plain commands between; store O cancels members and at times retires a
    device; store C runs ``cleanup()`` in a loop; a stream and drain loops read."""
    rng, book = seeded(), Book()
    async with space_on(backend, tmp_path) as space:
        devices = [space.device() for _ in range(4)]
        p, o, c, s, d = [await space.open() for _ in range(5)]
        end = time.monotonic() + 5

        async def produce() -> None:
            while time.monotonic() < end:
                targets = rng.sample(devices, rng.randint(2, 4))
                ttl = rng.uniform(0.3, 0.9) if rng.random() < 0.25 else LONG
                payload = f"F{next(book.n):05d}".encode()  # one per rollout: keyed payload@device
                members = [book.new(t, "", payload + b"@" + t.encode(), slot="fw") for t in targets]
                rollout = await p.enqueue_many(targets, payload, ttl, command_type="fw")
                for m, cid in zip(members, rollout.command_ids, strict=True):
                    book.written(m, cid)
                    m.expires = time.monotonic() + ttl if ttl < LONG else None
                for t in rng.sample(devices, 2):
                    plain = book.new(t, "P")
                    book.written(plain, await p.enqueue(t, plain.payload, LONG))

        async def operate() -> None:
            while time.monotonic() < end:
                await asyncio.sleep(rng.uniform(0.02, 0.1))
                if rng.random() < 0.12:
                    device, began = rng.choice(devices), time.monotonic()
                    await o.retire_device(device)
                    for op in book.ops.values():  # begun before it returned
                        if op.device == device and op.start < time.monotonic():
                            if op.ready and op.ready[1] < began:
                                op.gone_at = op.gone_at or time.monotonic()
                            else:
                                op.maybe_gone = True
                    continue
                live = [m for m in book.ops.values() if m.slot and m.id and m.gone_at is None]
                if live:
                    victim = rng.choice(live[-8:])
                    with suppress(QueueError):  # not found: delivered, replaced, expired
                        await o.cancel_command(victim.id or "")
                        victim.gone_at = time.monotonic()

        async def sweep() -> None:
            while time.monotonic() < end:
                await asyncio.gather(c.cleanup(), asyncio.sleep(0.05))

        await reading(book, s, d, devices, asyncio.gather(produce(), operate(), sweep()))
        wrong = await book.final(d, devices, 5)
    assert not book.problems(), book.problems()
    assert not wrong, f"statuses: {wrong}"
