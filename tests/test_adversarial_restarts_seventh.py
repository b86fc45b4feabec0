"""Seventh adversarial round: processes SIGKILLed at random moments, then restarted.

Producers (sequential and concurrent enqueue, enqueue_or_update, enqueue_with_confirmation,
confirm_command, enqueue_many, confirm_rollout), consumers and the HTTP sidecar are killed with
SIGKILL; a new store on the same state URL and exchange then delivers. Judged against
DESIGN.md: every call that returned is delivered once, in ready order per device, nothing
unready or replaced is delivered, a call that did not return at most once, and get_status
agrees with what was delivered. Public API only; every backend with a durable index.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import CommandStatus, RabbitMQConfig, RabbitMQStore
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import eventually, matrix, unique
from tests.tcp_proxy import BROKER_PORT, StallProxy, TCPProxy
from tests.test_adversarial_seams import state_url_for

BACKENDS = ["sqlite", "postgres", "redis"]
ROOT = Path(__file__).resolve().parent.parent


class Child:
    """A child process whose stdout lines (JSON events) are read as they come."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.events: list[dict[str, Any]] = []
        self.ready = asyncio.Event()
        # Set once the child finished enough calls to judge (a kill before that judges none).
        self.judgeable = asyncio.Event()
        self.stderr = b""
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.restarts_seventh_child",
            *self.args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        async with asyncio.timeout(30):
            await self.ready.wait()

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            if not line.endswith(b"\n"):
                break  # a line cut by the kill
            event = json.loads(line)
            self.events.append(event)
            if event["ev"] == "ready":
                self.ready.set()
            elif event["ev"] in ("done", "body_done") and (
                sum(e["ev"] == event["ev"] for e in self.events) > 20
            ):
                self.judgeable.set()  # a producer's calls, or a consumer's loop bodies
        if not self.ready.is_set():
            assert self._proc.stderr is not None
            self.stderr = await self._proc.stderr.read()
            self.ready.set()

    async def call(self, device: str, payload: str, seconds: float = 20.0) -> dict[str, Any]:
        """Has a scripted child enqueue ``payload``; returns the call's end event."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"device": device, "payload": payload}).encode() + b"\n")
        await self._proc.stdin.drain()
        async with asyncio.timeout(seconds):
            while True:
                for event in self.events:
                    if event.get("key") == payload and event["ev"] in ("done", "raised", "foreign"):
                        return event
                await asyncio.sleep(0.02)

    async def kill(self) -> None:
        assert self._proc is not None
        assert self._reader is not None
        if self._proc.returncode is None:
            self._proc.send_signal(signal.SIGKILL)
        await self._proc.wait()
        await self._reader


# -- the judge ----------------------------------------------------------------------------


@dataclass
class Unit:
    """One command (a device's share of a call): when it was made ready, and whether the
    call that made it (and that made it ready) returned."""

    device: str
    payload: str
    kind: str
    lane_key: str  # latest-wins group: (device, type) replays as one sequence
    call_start: float
    call_end: float | None
    command_id: str | None
    ready_start: float | None = None
    ready_end: float | None = None
    needs_ready_call: bool = False
    ready_call_started: bool = False
    delivered: list[int] = field(default_factory=list)


def build_units(events: list[dict[str, Any]], devices: list[str]) -> dict[tuple[str, str], Unit]:
    starts: dict[tuple[str, str], dict[str, Any]] = {}
    ends: dict[tuple[str, str], dict[str, Any]] = {}
    for event in events:
        if event["ev"] == "start":
            starts[(event["op"], event["key"])] = event
        elif event["ev"] in ("done", "raised", "foreign"):
            ends[(event["op"], event["key"])] = event
    units: dict[tuple[str, str], Unit] = {}
    for (op, key), start in starts.items():
        end = ends.get((op, key)) or {"ev": "unfinished"}
        returned = end["ev"] == "done"
        if op in ("plain", "update", "confirmable"):
            unit = Unit(
                device=start["device"],
                payload=key,
                kind=op,
                lane_key=f"{start['device']}/sp" if op == "update" else key,
                call_start=start["t"],
                call_end=end["t"] if returned else None,
                command_id=end["result"] if returned else None,
                needs_ready_call=op == "confirmable",
            )
            units[(unit.device, key)] = unit
        elif op.startswith("fanout"):
            ids = end["result"]["ids"] if returned else [None] * len(devices)
            for device, command_id in zip(devices, ids, strict=True):
                unit = Unit(
                    device=device,
                    payload=key,
                    kind=op,
                    lane_key=f"{device}/fw" if op == "fanout_update" else f"{device}/{key}",
                    call_start=start["t"],
                    call_end=end["t"] if returned else None,
                    command_id=command_id,
                    needs_ready_call=op == "fanout_confirmable",
                )
                units[(device, key)] = unit
    for (op, key), start in starts.items():
        end = ends.get((op, key)) or {"ev": "unfinished"}
        returned = end["ev"] == "done"
        if op == "confirm":
            targets = [units[(start["device"], key)]]
        elif op == "confirm_rollout":
            targets = [units[(device, key)] for device in devices]
        else:
            continue
        for unit in targets:
            unit.ready_call_started = True
            unit.ready_start = start["t"]
            unit.ready_end = end["t"] if returned else None
    for unit in units.values():
        if not unit.needs_ready_call:
            unit.ready_start, unit.ready_end = unit.call_start, unit.call_end
    return units


def judge(
    events: list[dict[str, Any]],
    devices: list[str],
    delivered: dict[str, list[tuple[str, str]]],
) -> tuple[list[str], dict[tuple[str, str], Unit]]:
    problems: list[str] = []
    foreign = [e for e in events if e["ev"] == "foreign"]
    problems += [f"exception outside QueueError: {e}" for e in foreign]
    units = build_units(events, devices)
    for device in devices:
        for position, (command_id, payload) in enumerate(delivered[device]):
            unit = units.get((device, payload))
            if unit is None:
                problems.append(f"{device}: delivered {payload!r}, never enqueued")
                continue
            unit.delivered.append(position)
            if unit.command_id is not None and unit.command_id != command_id:
                problems.append(
                    f"{device}: {payload} came as {command_id}, enqueue said {unit.command_id}"
                )
            if unit.command_id is None:
                unit.command_id = command_id
    # Latest-wins groups: at most one per group delivered; the last returned one or a later one.
    groups: dict[str, list[Unit]] = defaultdict(list)
    for unit in units.values():
        groups[unit.lane_key].append(unit)
    for lane_key, members in groups.items():
        members.sort(key=lambda u: u.call_start)
        got = [u for u in members if u.delivered]
        for unit in got:
            if len(unit.delivered) > 1:
                problems.append(
                    f"{unit.device}: {unit.payload} delivered {len(unit.delivered)} times"
                )
            if unit.needs_ready_call and not unit.ready_call_started:
                problems.append(f"{unit.device}: {unit.payload} delivered, never confirmed")
        if len(members) == 1:
            unit = members[0]
            if unit.ready_end is not None and unit.call_end is not None and not unit.delivered:
                problems.append(f"{unit.device}: {unit.kind} {unit.payload} accepted, lost")
            continue
        # A replacing group (one writer at a time, in order).
        if len(got) > 1:
            problems.append(
                f"{lane_key}: {len(got)} of one type delivered: {[u.payload for u in got]}"
            )
        returned = [u for u in members if u.call_end is not None]
        if returned:
            last = returned[-1]
            allowed = {id(u) for u in members if u.call_start >= last.call_start}
            for unit in got:
                if id(unit) not in allowed:
                    problems.append(
                        f"{lane_key}: replaced {unit.payload} delivered (last {last.payload})"
                    )
            if not got:
                problems.append(f"{lane_key}: last accepted {last.payload} lost")
    # Ready order: a command made ready by a call that returned before another's started
    # comes first.
    for device in devices:
        seq = [units.get((device, payload)) for _, payload in delivered[device]]
        seq_known = [u for u in seq if u is not None]
        for i, earlier in enumerate(seq_known):
            for later in seq_known[i + 1 :]:
                if (
                    later.ready_end is not None
                    and earlier.ready_start is not None
                    and later.ready_end < earlier.ready_start
                ):
                    problems.append(
                        f"{device}: {later.payload} (ready by {later.ready_end:.3f}) came "
                        f"after {earlier.payload} (made ready from {earlier.ready_start:.3f})"
                    )
    # A fan-out is atomic: on every device or none.
    fanouts: dict[str, list[Unit]] = defaultdict(list)
    for unit in units.values():
        if unit.kind.startswith("fanout") and unit.kind != "fanout_update":
            fanouts[unit.payload].append(unit)
    for payload, members in fanouts.items():
        counts = {bool(u.delivered) for u in members}
        if len(counts) > 1 and all(u.ready_call_started or not u.needs_ready_call for u in members):
            problems.append(
                f"fan-out {payload} delivered to some devices only: "
                f"{[u.device for u in members if u.delivered]}"
            )
    return problems, units


async def expected_status(unit: Unit) -> set[CommandStatus]:
    if unit.delivered:
        return {CommandStatus.DELIVERED}
    if unit.needs_ready_call and unit.ready_end is None:
        # Never confirmed, or its confirm cut by the kill (types are unique per call).
        return {CommandStatus.AWAITING_CONFIRMATION}
    if unit.kind in ("update", "fanout_update"):
        return {CommandStatus.SUPERSEDED}
    return {CommandStatus.DELIVERED}  # accepted and ready: it should have come


async def collect(
    amqp_url: str,
    state_url: str,
    exchange: str,
    devices: list[str],
    units_required: Any,
    *,
    reader: str = "consume",
    events: list[dict[str, Any]] | None = None,
) -> dict[str, list[tuple[str, str]]]:
    """Consumes (or drains) every device on a new store until quiet, then closes it. With
    ``events``, the new store first enqueues one plain command per device (recorded there):
    it must come after everything accepted before the restart."""
    config = RabbitMQConfig(exchange=exchange, relay_after=0.5, relay_interval=1.0)
    store = await RabbitMQStore.connect(amqp_url, state_url=state_url, config=config)
    delivered: dict[str, list[tuple[str, str]]] = {device: [] for device in devices}
    last = [time.monotonic()]
    if events is not None:
        for device in devices:
            key = f"{device}/R"
            events.append(dict(ev="start", op="plain", key=key, device=device, t=time.monotonic()))
            command_id = await store.enqueue(device, key.encode(), 600)
            events.append(
                dict(
                    ev="done",
                    op="plain",
                    key=key,
                    device=device,
                    t=time.monotonic(),
                    result=command_id,
                )
            )

    async def read(device: str) -> None:
        if reader == "drain":
            while True:
                for record in await store.drain_commands(device):
                    delivered[device].append((record.id, record.payload.decode()))
                    last[0] = time.monotonic()
                await asyncio.sleep(0.1)
        async with store.consume(device) as stream:
            async for command in stream:
                delivered[device].append((command.id, command.payload.decode()))
                last[0] = time.monotonic()

    tasks = [asyncio.create_task(read(device)) for device in devices]
    started = time.monotonic()
    try:
        while time.monotonic() - started < 40:
            await asyncio.sleep(0.2)
            quiet = time.monotonic() - last[0]
            if quiet > 3.0 and time.monotonic() - started > 3.0 and units_required(delivered):
                break
    finally:
        await store.close()
        async with asyncio.timeout(15):
            await asyncio.gather(*tasks, return_exceptions=True)
    return delivered


async def check_statuses(
    amqp_url: str,
    state_url: str,
    exchange: str,
    units: dict[tuple[str, str], Unit],
    devices: list[str],
) -> list[str]:
    problems: list[str] = []
    config = RabbitMQConfig(exchange=exchange)
    async with await RabbitMQStore.connect(amqp_url, state_url=state_url, config=config) as store:
        for unit in units.values():
            if unit.command_id is None:
                continue
            status = await store.get_status(unit.command_id)
            want = await expected_status(unit)
            if status not in want:
                problems.append(
                    f"{unit.device}: {unit.kind} {unit.payload} status {status.value}, expected "
                    f"{sorted(s.value for s in want)} (delivered {len(unit.delivered)}x)"
                )
        for device in devices:
            for command in await store.get_pending(device):
                if not (command.requires_confirmation and not command.confirmed):
                    problems.append(f"{device}: ready {command.payload!r} pending, never delivered")
    return problems


def all_required(units_box: list[dict[tuple[str, str], Unit]]) -> Any:
    def check(delivered: dict[str, list[tuple[str, str]]]) -> bool:
        units = units_box[0]
        seen = {(device, payload) for device, got in delivered.items() for _, payload in got}
        for key, unit in units.items():
            if (
                unit.kind in ("plain", "fanout", "confirmable", "fanout_confirmable")
                and unit.call_end is not None
                and (not unit.needs_ready_call or unit.ready_end is not None)
                and key not in seen
            ):
                return False
        return True

    return check


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("kind", "mode", "reader"),
    matrix(
        [(k, m, r) for k in BACKENDS for m in ("seq", "conc") for r in ("consume", "drain")],
        [("sqlite", "seq", "consume"), ("postgres", "conc", "drain"), ("redis", "conc", "consume")],
    ),
)
async def test_producer_killed_then_restarted_delivers_every_accepted_command_once_in_order(
    kind: str, mode: str, reader: str, tmp_path: Path
) -> None:
    seed = os.environ.get("ADV7_SEED") or str(random.randrange(1 << 30))
    rng = random.Random(seed)
    exchange = unique("test.adv7.")
    devices = [unique("d7-") for _ in range(3)]
    problems: list[str] = []
    try:
        async with state_url_for(kind, tmp_path) as state_url:
            child = Child("producer", AMQP_URL, state_url, exchange, seed, mode, ",".join(devices))
            await child.start()
            assert not child.stderr, child.stderr.decode()
            # Killed at a random moment once it made enough calls to judge: a child slow to
            # start (six test processes starting together) made 3 in 0.3 s.
            async with asyncio.timeout(30):
                await child.judgeable.wait()
            await asyncio.sleep(rng.uniform(0.0, 2.2))
            await child.kill()
            events = child.events
            box = [build_units(events, devices)]
            delivered = await collect(
                AMQP_URL,
                state_url,
                exchange,
                devices,
                all_required(box),
                reader=reader,
                events=events,
            )
            problems, units = judge(events, devices, delivered)
            problems += await check_statuses(AMQP_URL, state_url, exchange, units, devices)
    finally:
        await delete_namespace(exchange, devices)
    calls = sum(1 for e in events if e["ev"] == "done")
    assert calls > 20, "the child made too few calls to judge"
    assert not problems, f"seed {seed} ({calls} calls returned):\n" + "\n".join(problems[:30])


async def _consume_for(
    store: RabbitMQStore, device: str, count: int, seconds: float
) -> list[tuple[str, float]]:
    """What one stream hands out until ``count`` came or ``seconds`` passed: (payload, when)."""
    got: list[tuple[str, float]] = []
    start = time.monotonic()
    try:
        async with asyncio.timeout(seconds), store.consume(device) as stream:
            async for command in stream:
                got.append((command.payload.decode(), round(time.monotonic() - start, 2)))
                if len(got) >= count:
                    break
    except TimeoutError:
        pass
    return got


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", matrix(BACKENDS, ["sqlite", "redis"]))
async def test_restart_while_a_dead_store_holds_the_relay_lease_keeps_accepted_commands_in_order(
    kind: str, tmp_path: Path
) -> None:
    """Three processes on one index, each killed in turn. P0 is cut off from the broker,
    accepts X (owed to its relay) and dies. P1 starts, its relay sweeps X as an orphan (and
    so takes the index's relay lease); its link to the broker stalls, it accepts A (the
    enqueue returns after publish_timeout, A owed to its relay) and it is killed while its
    relay still waits on the stalled link, holding the lease. P2 starts on the same index
    and enqueues B: the device must get X, A, B. A's enqueue returned before B's began, so
    A is ahead of B in ready order (DESIGN.md: "in ready order per device", "survives
    restarts")."""
    exchange = unique("test.adv7.")
    device = unique("d7-")
    try:
        async with state_url_for(kind, tmp_path) as state_url:
            async with TCPProxy() as proxy0:
                p0 = Child("scripted", proxy0.amqp_url, state_url, exchange, "4.0")
                await p0.start()
                assert (await p0.call(device, "warm"))["ev"] == "done"
                await proxy0.cut()
                assert (await p0.call(device, "X"))["ev"] == "done"
                await p0.kill()
            await asyncio.sleep(4.2)  # X is past P1's relay_after: an orphan to sweep
            async with StallProxy(BROKER_PORT) as proxy1:
                p1 = Child("scripted", proxy1.amqp_url, state_url, exchange, "4.0")
                await p1.start()  # its first relay pass sweeps X, taking the lease (8 s)
                await asyncio.sleep(0.3)
                proxy1.stall()
                accepted = await p1.call(device, "A")
                assert accepted["ev"] == "done", accepted
                await p1.kill()  # its relay is stuck on the stall: the lease is still held
            await asyncio.sleep(1.2)  # A is past P2's relay_after
            config = RabbitMQConfig(exchange=exchange, relay_after=1.0, relay_interval=1.0)
            async with await RabbitMQStore.connect(
                AMQP_URL, state_url=state_url, config=config
            ) as p2:
                await p2.enqueue(device, b"B", 600)
                got = await _consume_for(p2, device, 4, 15)
                status_a = await p2.get_status(accepted["result"])
    finally:
        await delete_namespace(exchange, [device])
    assert status_a == CommandStatus.DELIVERED
    assert [payload for payload, _ in got] == ["warm", "X", "A", "B"], got


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", matrix(BACKENDS, ["redis"]))
async def test_consumer_killed_mid_stream_then_restarted_loses_nothing_repeats_no_marked_one(
    kind: str, tmp_path: Path
) -> None:
    """A device process consumes and is SIGKILLed mid-stream. Read after the kill, a command
    the index says DELIVERED had its loop body finished, and never comes again; every other
    command comes to the next stream exactly once, in enqueue order."""
    seed = os.environ.get("ADV7_SEED") or str(random.randrange(1 << 30))
    rng = random.Random(seed)
    exchange = unique("test.adv7.")
    device = unique("d7-")
    config = RabbitMQConfig(exchange=exchange)
    try:
        async with (
            state_url_for(kind, tmp_path) as state_url,
            await RabbitMQStore.connect(AMQP_URL, state_url=state_url, config=config) as producer,
        ):
            ids = [await producer.enqueue(device, f"c{n}".encode(), 600) for n in range(600)]
            child = Child("consumer", AMQP_URL, state_url, exchange, device, seed)
            await child.start()
            # Killed at a random moment once a few loop bodies ended: a kill in the child's
            # start-up (six workers starting beside it) marked nothing to judge.
            async with asyncio.timeout(30):
                await child.judgeable.wait()
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            await child.kill()
            await asyncio.sleep(0.5)
            after_kill = {cid: await producer.get_status(cid) for cid in ids}
            marked = {
                cid for cid, status in after_kill.items() if status == CommandStatus.DELIVERED
            }
            rest = [cid for cid in ids if cid not in marked]
            got = await _consume_ids(producer, device, len(rest), 20)
            final = {cid: await producer.get_status(cid) for cid in ids}
    finally:
        await delete_namespace(exchange, [device])
    finished = {e["id"] for e in child.events if e["ev"] == "body_done"}
    handed = [e["id"] for e in child.events if e["ev"] == "body"]
    assert marked, f"seed {seed}: the kill came before any mark"
    assert rest, f"seed {seed}: the kill came after the stream ended"
    assert marked <= finished, f"seed {seed}: marked without a finished body: {marked - finished}"
    assert handed == ids[: len(handed)], f"seed {seed}: the child's stream went out of order"
    again = [cid for cid in got if cid in marked]
    assert not again, f"seed {seed}: {len(again)} marked commands came again"
    assert got == rest, f"seed {seed}: got {len(got)}, expected {len(rest)} ({len(marked)} marked)"
    assert all(status == CommandStatus.DELIVERED for status in final.values())


async def _consume_ids(store: RabbitMQStore, device: str, count: int, seconds: float) -> list[str]:
    """Ids one stream hands out until ``count`` came, then 1 s more, or ``seconds`` passed."""
    got: list[str] = []
    deadline = time.monotonic() + seconds

    async def read() -> None:
        async with store.consume(device) as stream:
            async for command in stream:
                got.append(command.id)
                if len(got) >= count:
                    await asyncio.sleep(1.0)  # room for a repeat to show up

    task = asyncio.create_task(read())
    while time.monotonic() < deadline and not task.done():
        if len(got) >= count:
            await asyncio.sleep(1.5)
            break
        await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return got


class Sidecar:
    """``amqp-queue serve`` as a process on a free port."""

    TOKEN = "adv7-token-0123456789"

    def __init__(self, state_url: str, exchange: str) -> None:
        self.env = {
            **os.environ,
            "AMQP_URL": AMQP_URL,
            "AMQP_QUEUE_STATE_URL": state_url,
            "AMQP_QUEUE_EXCHANGE": exchange,
            "AMQP_QUEUE_BIND": "127.0.0.1:0",
            "AMQP_QUEUE_TOKENS": f"ci:{self.TOKEN}",
        }
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "amqp_queue.cli",
            "serve",
            env=self.env,
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.process.stderr is not None
        async with asyncio.timeout(30):
            while line := (await self.process.stderr.readline()).decode():
                self.log.append(line)
                if "serving the operator API on " in line:
                    self.url = line.split("serving the operator API on ")[1].split()[0]
                    break
        assert self.url, "".join(self.log)
        self._reader = asyncio.create_task(self._keep_reading())

    async def _keep_reading(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.log.append(line.decode())

    async def kill(self) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        if self._reader is not None:
            await self._reader


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("kind", "kills"), matrix([(kind, 2) for kind in BACKENDS], [("postgres", 1)])
)
async def test_sidecar_killed_under_http_enqueues_delivers_every_answered_command_once(
    kind: str, kills: int, tmp_path: Path
) -> None:
    """Lanes POST plain and latest-wins commands (one request at a time per lane) while the
    sidecar is SIGKILLed and started again (``kills`` times); a library store then consumes.
    Every 201 is delivered once, in the lane's order; per device only the last answered latest-wins
    command (or one in flight after it) arrives; statuses agree."""
    import httpx

    seed = os.environ.get("ADV7_SEED") or str(random.randrange(1 << 30))
    rng = random.Random(seed)
    exchange = unique("test.adv7.")
    devices = [unique("d7-") for _ in range(3)]
    events: list[dict[str, Any]] = []
    stop = asyncio.Event()
    headers = {"Authorization": f"Bearer {Sidecar.TOKEN}"}
    problems: list[str] = []
    try:
        async with state_url_for(kind, tmp_path) as state_url:
            sidecar = Sidecar(state_url, exchange)
            await sidecar.start()
            current = [sidecar]

            async def lane(device: str, latest: bool, name: str) -> None:
                n = 0
                async with httpx.AsyncClient(headers=headers, timeout=10) as client:
                    while not stop.is_set():
                        n += 1
                        key = f"{device}/{name}{n}"
                        op = "update" if latest else "plain"
                        body: dict[str, Any] = {"payload": key, "ttl": 600}
                        if latest:
                            body |= {"mode": "latest", "command_type": "sp"}
                        events.append(
                            dict(ev="start", op=op, key=key, device=device, t=time.monotonic())
                        )
                        try:
                            answer = await client.post(
                                f"{current[0].url}/devices/{device}/commands", json=body
                            )
                        except httpx.TransportError:
                            await asyncio.sleep(0.05)
                            continue
                        if answer.status_code == 201:
                            events.append(
                                dict(
                                    ev="done",
                                    op=op,
                                    key=key,
                                    device=device,
                                    t=time.monotonic(),
                                    result=answer.json()["id"],
                                )
                            )
                        else:
                            events.append(
                                dict(
                                    ev="raised",
                                    op=op,
                                    key=key,
                                    device=device,
                                    t=time.monotonic(),
                                    error=answer.status_code,
                                )
                            )
                            if answer.status_code >= 500:
                                problems.append(f"{key}: {answer.status_code} {answer.text}")

            lanes = [
                asyncio.create_task(lane(device, latest, name))
                for device in devices
                for latest, name in ((False, "p"), (False, "q"), (True, "u"))
            ]
            for _ in range(kills):
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                await current[0].kill()
                fresh = Sidecar(state_url, exchange)
                await fresh.start()
                current[0] = fresh
            await asyncio.sleep(1.0)

            # Enough answered to judge, however slowly the last sidecar came up under load
            # (a busy machine answered 30 in one run).
            async def enough() -> bool:
                return sum(1 for e in events if e["ev"] == "done") > 30

            with suppress(TimeoutError):
                await eventually(enough, 20)
            stop.set()
            await asyncio.gather(*lanes)
            await current[0].kill()
            box = [build_units(events, devices)]
            delivered = await collect(AMQP_URL, state_url, exchange, devices, all_required(box))
            found, units = judge(events, devices, delivered)
            problems += found
            problems += await check_statuses(AMQP_URL, state_url, exchange, units, devices)
    finally:
        await delete_namespace(exchange, devices)
    answered = sum(1 for e in events if e["ev"] == "done")
    assert answered > 30
    assert not problems, f"seed {seed} ({answered} answered):\n" + "\n".join(problems[:30])
