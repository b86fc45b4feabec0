"""Third round of adversarial scenarios on the public API of RabbitMQStore, over the real broker
and every state backend (SQLite, PostgreSQL, Redis): short real TTLs under load (statuses after
expiry), cleanup with no retention racing delivery, the operator HTTP API acting next to
library consumers on one index, fleet rollouts racing consumers, cancels and a restart,
several OS processes sharing one index, drain_pending and consume on one device at once with
cancels in between, outcome deadlines racing reports, and confirm_rollout racing a
replacement.

Only ``amqp_queue``'s public names act; tests/ helpers set up and tear down.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections import Counter
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import (
    CommandExpired,
    CommandNotFound,
    CommandStatus,
    RabbitMQConfig,
)
from tests import test_adversarial_seams
from tests.rabbitmq_support import AMQP_URL
from tests.test_adversarial_seams import (
    LONG,
    Env,
    Handout,
    _seeded,
    assert_ascending,
    assert_once,
    consume_until,
    drain_everything,
    drain_until_empty,
    number,
    numbered,
    statuses,
)

env = test_adversarial_seams.env

pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

FINAL_DELIVERED = {
    CommandStatus.DELIVERED,
    CommandStatus.SUCCEEDED,
    CommandStatus.FAILED,
    CommandStatus.TIMED_OUT,
}


# -- 2. short real TTLs under load: nothing expired handed out, statuses say EXPIRED ------------


async def test_short_ttls_under_load_expire_in_status_and_are_never_handed_out(env: Env) -> None:
    """Four devices get plain, latest-wins and confirmation commands, a third of them living
    1-2 s, while store B consumes two devices (a slow body) and store C drains the other two
    in a loop; store A confirms the short confirmation commands at random moments. Once every
    short TTL has passed (no cleanup has run yet): nothing was handed out at or after its
    expiry, every short command not handed out is EXPIRED in get_status (not PENDING or
    AWAITING_CONFIRMATION), absent from get_pending, and confirm raises CommandExpired."""
    a = await env.open()
    b = await env.open(prefetch=5)
    c = await env.open(prefetch=5)
    rng = _seeded()
    devices = [env.device() for _ in range(4)]
    kinds: dict[str, str] = {}
    short: dict[str, datetime] = {}
    ids: dict[str, list[str]] = {d: [] for d in devices}
    for i in range(120):
        d = devices[i % 4]
        ttl = rng.uniform(1.0, 2.0) if i % 3 == 0 else LONG
        kind = ("plain", "latest", "confirm")[(i // 4) % 3]
        payload = b"%s:%d" % (kind.encode(), i)
        if kind == "plain":
            cid = await a.enqueue(d, payload, ttl)
        elif kind == "latest":
            cid = await a.enqueue_or_update(d, f"sp{i % 5}", payload, ttl)
        else:
            cid = await a.enqueue_with_confirmation(d, f"c{i}", payload, ttl)
        kinds[cid] = kind
        ids[d].append(cid)
        if ttl != LONG:
            short[cid] = datetime.now(UTC) + timedelta(seconds=ttl)
    horizon = max(short.values())
    confirm_ok: set[str] = set()
    confirm_expired: set[str] = set()

    async def confirmer() -> None:
        todo = [cid for cid, k in kinds.items() if k == "confirm"]
        rng.shuffle(todo)
        for cid in todo:
            try:
                await a.confirm_command(cid)
                confirm_ok.add(cid)
            except CommandExpired:
                confirm_expired.add(cid)
            except CommandNotFound:
                pass
            await asyncio.sleep(rng.uniform(0, 0.04))

    outs: dict[str, list[Handout]] = {d: [] for d in devices}
    drained: dict[str, list[tuple[bytes, datetime]]] = {d: [] for d in devices}
    stop = asyncio.Event()

    async def drainer(d: str) -> None:
        while not stop.is_set():
            asked = datetime.now(UTC)
            for p in await c.drain_pending(d):
                drained[d].append((p, asked))
            await asyncio.sleep(0.05)

    consumers = [
        asyncio.create_task(
            consume_until(
                b, d, outs[d], done=stop.is_set, body=lambda h: asyncio.sleep(0.03), idle=1.0
            )
        )
        for d in devices[:2]
    ]
    drainers = [asyncio.create_task(drainer(d)) for d in devices[2:]]
    await asyncio.wait_for(confirmer(), 15)
    wait = (horizon - datetime.now(UTC)).total_seconds() + 0.3
    await asyncio.sleep(max(wait, 0))
    stop.set()
    await asyncio.wait_for(asyncio.gather(*consumers, *drainers), 15)
    # The stale check: a hand-out asked for after its expiry.
    late = [
        (h.payload, h.asked, h.expires_at)
        for d in devices[:2]
        for h in outs[d]
        if h.asked >= h.expires_at
    ]
    assert not late, f"expired commands handed out: {late}"
    payload_id = {}
    for d in devices:
        for cid in ids[d]:
            payload_id[(d, (await a.get_command(cid)).payload)] = cid
    drained_late = [
        (p, asked)
        for d in devices[2:]
        for p, asked in drained[d]
        if payload_id[(d, p)] in short and asked >= short[payload_id[(d, p)]]
    ]
    assert not drained_late, f"expired commands drained: {drained_late}"
    handed = {h.id for d in devices[:2] for h in outs[d]} | {
        payload_id[(d, p)] for d in devices[2:] for p, _ in drained[d]
    }
    assert_once([h.id for d in devices[:2] for h in outs[d]])
    got = await statuses(a, list(short))
    wrong = {
        (kinds[cid], got[cid].value)
        for cid in short
        if cid not in handed and got[cid] not in (CommandStatus.EXPIRED, CommandStatus.SUPERSEDED)
    }
    assert not wrong, f"past its TTL, not handed out, status still: {wrong}"
    for d in devices:
        left = {p.id for p in await a.get_pending(d)}
        assert not left & set(short), f"expired commands still listed pending on {d}"
    for cid in short:
        if kinds[cid] == "confirm" and cid not in handed and got[cid] == CommandStatus.EXPIRED:
            with pytest.raises(CommandExpired):
                await a.confirm_command(cid)
    for cid in confirm_expired:
        assert cid not in handed
    # Still open past its TTL: what cleanup ends. (A latest-wins enqueue into an expired
    # command's slot, or a drain's give-back, ends it EXPIRED itself: on a busy machine the
    # enqueues above outlast the shortest TTLs.)
    expired_before = 0
    for cid in short:
        if got[cid] == CommandStatus.EXPIRED and (await a.get_command(cid)).is_open:
            expired_before += 1
    counted = await a.cleanup()
    assert counted == expired_before, (counted, expired_before)
    after = await statuses(a, list(short))
    assert after == got, "cleanup changed a status"


# -- 3. cleanup with no retention racing delivery, cancels and status reads ----------------------

_RANK = {
    CommandStatus.AWAITING_CONFIRMATION: 0,
    CommandStatus.PENDING: 1,
}


def _check_history(cid: str, seen: list[Any]) -> None:
    """Statuses a reader saw for one command, in order: never back to open after a final one,
    and once pruned (CommandNotFound) never found again."""
    final_seen = False
    gone = False
    for s in seen:
        if s == "gone":
            gone = True
            continue
        assert not gone, f"{cid}: pruned, then found again as {s}: {seen}"
        if s in _RANK:
            assert not final_seen, f"{cid}: open again after a final status: {seen}"
        else:
            final_seen = True


async def test_cleanup_with_zero_retention_racing_a_stream_cancels_and_status_reads(
    env: Env,
) -> None:
    """Retention 0: every cleanup prunes whatever is final. Store B consumes a device with a
    slow body; store A cancels some commands (sometimes the one in hand) and runs cleanup in a
    tight loop, while a reader polls every status. The stream goes on to the end, hands out
    each command once, in order, nothing cancelled before it was handed out; status reads
    never go back to open after a final status, nor come back after a prune."""
    device = env.device()
    a = await env.open(retention=timedelta(0))
    b = await env.open(retention=timedelta(0))
    rng = _seeded()
    n = 40
    ids = [await a.enqueue(device, numbered(i), LONG) for i in range(n)]
    cancelled: dict[str, datetime] = {}
    in_hand: list[str] = []
    seen: dict[str, list[Any]] = {cid: [] for cid in ids}
    stop = asyncio.Event()
    out: list[Handout] = []

    async def body(h: Handout) -> None:
        in_hand.append(h.id)
        if rng.random() < 0.3:
            # Cancel the command in hand (rule 5: it ends DELIVERED, or is pruned first).
            with suppress(CommandNotFound):
                await a.cancel_command(h.id)
            await a.cleanup()
        await asyncio.sleep(0.02)

    async def canceller() -> None:
        for cid in rng.sample(ids, n // 4):
            try:
                await a.cancel_command(cid)
                cancelled[cid] = datetime.now(UTC)
            except CommandNotFound:
                pass
            await asyncio.sleep(rng.uniform(0, 0.05))

    async def cleaner() -> None:
        while not stop.is_set():
            await a.cleanup()
            await asyncio.sleep(0.005)

    async def reader() -> None:
        while not stop.is_set():
            for cid in ids:
                try:
                    seen[cid].append(await a.get_status(cid))
                except CommandNotFound:
                    seen[cid].append("gone")
            await asyncio.sleep(0)

    background = [asyncio.create_task(f()) for f in (cleaner, reader)]
    cancelling = asyncio.create_task(canceller())
    await asyncio.wait_for(consume_until(b, device, out, done=lambda: False, body=body, idle=3), 20)
    await cancelling
    stop.set()
    await asyncio.gather(*background)
    handed = [h.id for h in out]
    assert_once(handed)
    assert_ascending([h.payload for h in out])
    stale = [number(h.payload) for h in out if h.id in cancelled and cancelled[h.id] < h.asked]
    assert not stale, f"cancelled before it was asked for, still handed out: {stale}"
    # Everything not cancelled was handed out.
    assert set(ids) - set(cancelled) <= set(handed), "lost"
    assert await a.get_pending(device) == []
    for cid in ids:
        _check_history(cid, seen[cid])
    for cid in ids:
        try:
            status = await a.get_status(cid)
        except CommandNotFound:
            continue
        if cid in handed:
            assert status in FINAL_DELIVERED | {CommandStatus.CANCELLED}, status
            # An in-hand cancel that was not pruned meanwhile ends DELIVERED after the body.
            assert status != CommandStatus.CANCELLED or cid not in in_hand, (cid, status)
        else:
            assert status == CommandStatus.CANCELLED, (cid, status)


# -- 4. the operator HTTP API next to library consumers on one index -----------------------------


async def test_operator_api_enqueues_confirms_and_cancels_while_a_library_store_consumes(
    env: Env, tmp_path: Path
) -> None:
    """The sidecar's HTTP API (its own store on the shared index and exchange) takes
    latest-wins setpoints, plain commands and confirmation commands for one device, confirms
    and cancels some at random moments, while store B (a gateway process) consumes the device
    with a slow body. The device never gets a superseded setpoint or an older one after a
    newer one, nothing unconfirmed, nothing cancelled before it was asked for, every plain
    command once in order; what GET /commands/{id} says agrees with what the device got."""
    from tests.api_support import running

    device = env.device()
    b = await env.open(prefetch=4)
    rng = _seeded()
    config = RabbitMQConfig(exchange=env.exchange, relay_after=1.0, relay_interval=1.0)
    async with running(tmp_path, state_url=env.state_url, rabbitmq=config) as api:
        sp: list[str] = []
        plain: list[str] = []
        confirm: list[str] = []
        confirmed: set[str] = set()
        cancelled: dict[str, datetime] = {}
        out: list[Handout] = []
        writers_done = asyncio.Event()

        async def post(body: dict[str, Any]) -> str:
            response = await api.enqueue(device, ttl=LONG, **body)
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

        async def setpoints() -> None:
            for i in range(40):
                sp.append(
                    await post({"payload": f"sp:{i}", "mode": "latest", "command_type": "sp"})
                )
                await asyncio.sleep(rng.uniform(0, 0.01))

        async def plains() -> None:
            for i in range(30):
                plain.append(await post({"payload": f"plain:{i}"}))
                await asyncio.sleep(rng.uniform(0, 0.01))

        async def approvals() -> None:
            for i in range(20):
                cid = await post({"payload": f"ok:{i}", "mode": "confirm", "command_type": f"u{i}"})
                confirm.append(cid)
            order = list(confirm) + rng.sample(plain, min(8, len(plain)))
            rng.shuffle(order)
            for cid in order:
                if cid in confirm and rng.random() < 0.6:
                    r = await api.client.post(f"/commands/{cid}/confirm")
                    if r.status_code == 200:
                        confirmed.add(cid)
                if rng.random() < 0.35:
                    r = await api.client.post(f"/commands/{cid}/cancel")
                    if r.status_code == 200:
                        cancelled[cid] = datetime.now(UTC)
                    else:
                        assert r.status_code == 404, r.text
                await asyncio.sleep(rng.uniform(0, 0.01))

        async def writers() -> None:
            await asyncio.gather(setpoints(), plains(), approvals())
            writers_done.set()

        def finished() -> bool:
            return writers_done.is_set() and any(h.id == sp[-1] for h in out)

        consuming = asyncio.create_task(
            consume_until(b, device, out, done=finished, body=lambda h: asyncio.sleep(0.01), idle=4)
        )
        await asyncio.wait_for(writers(), 20)
        await asyncio.wait_for(consuming, 20)
        # Whatever is still ready arrives later: collect it.
        await asyncio.wait_for(consume_until(b, device, out, done=lambda: False, idle=1.5), 10)
        handed = [h.id for h in out]
        assert_once(handed)
        got_sp = [number(h.payload) for h in out if h.payload.startswith(b"sp:")]
        assert got_sp == sorted(got_sp), f"an older setpoint after a newer one: {got_sp}"
        assert sp[-1] in handed, "the last setpoint never came"
        got_plain = [number(h.payload) for h in out if h.payload.startswith(b"plain:")]
        assert got_plain == sorted(got_plain)
        assert set(plain) - set(cancelled) <= set(handed), "a plain command was lost"
        unconfirmed = [h.payload for h in out if h.id in confirm and h.id not in confirmed]
        assert not unconfirmed, f"unconfirmed commands handed out: {unconfirmed}"
        stale = [h.payload for h in out if h.id in cancelled and cancelled[h.id] < h.asked]
        assert not stale, f"cancelled (200) before it was asked for, handed out: {stale}"
        assert (confirmed - set(cancelled)) <= set(handed), "a confirmed command was lost"
        for cid in sp + plain + confirm:
            r = await api.client.get(f"/commands/{cid}")
            assert r.status_code == 200, r.text
            status = r.json()["status"]
            library = (await b.get_status(cid)).value
            assert status == library, (cid, status, library)
            if cid in handed:
                assert status == "delivered", (cid, status)
            elif cid in cancelled:
                assert status == "cancelled", (cid, status)
            elif cid in sp:
                assert status == "superseded", (cid, status)
            elif cid in confirm:
                assert status == "awaiting_confirmation", (cid, status)
            else:
                raise AssertionError(f"{cid} neither handed out nor cancelled: {status}")


# -- 5. fleet rollouts racing consumers, cancels and a store restart -----------------------------


async def test_rollouts_racing_consumers_drains_cancels_and_a_restart(env: Env) -> None:
    """Eight devices: four consumed on store B (which is closed mid-stream and replaced by B2
    on the same state), four drained in a loop on store C. Store A writes plain rollouts,
    typed (latest-wins) rollouts and rollouts needing confirmation, cancels one plain rollout
    and confirms one confirmation rollout while the devices read. Afterwards: each command
    handed out once, per device in write order, nothing from the cancelled rollout after its
    cancel, nothing unconfirmed; every rollout_summary agrees with what the devices got."""
    devices = [env.device() for _ in range(8)]
    streamed, drained_devs = devices[:4], devices[4:]
    a = await env.open()
    b = await env.open(prefetch=3)
    c = await env.open(prefetch=3)
    rng = _seeded()
    rollouts: list[tuple[str, Any]] = []  # (kind, rollout)
    cancelled_at: dict[str, datetime] = {}
    confirmed_rollouts: set[str] = set()
    outs: dict[str, list[Handout]] = {d: [] for d in devices}
    drained: dict[str, list[tuple[bytes, datetime]]] = {d: [] for d in drained_devs}
    writers_done = asyncio.Event()

    async def writer() -> None:
        for r in range(18):
            kind = ("plain", "typed", "confirm")[r % 3]
            payload = b"%s:%d" % (kind.encode(), r)
            if kind == "plain":
                rollout = await a.enqueue_many(devices, payload, LONG)
            elif kind == "typed":
                rollout = await a.enqueue_many(devices, payload, LONG, command_type="fw")
            else:
                rollout = await a.enqueue_many(
                    devices, payload, LONG, command_type=f"cf{r}", requires_confirmation=True
                )
            rollouts.append((kind, rollout))
            if r == 9:
                victim = rollouts[6][1]  # a plain rollout, maybe partly handed out
                await a.cancel_rollout(victim.rollout_id)
                cancelled_at[victim.rollout_id] = datetime.now(UTC)
            if r in (8, 14):
                await a.confirm_rollout(rollout.rollout_id)
                confirmed_rollouts.add(rollout.rollout_id)
            await asyncio.sleep(rng.uniform(0, 0.03))
        writers_done.set()

    async def drainer(d: str) -> None:
        quiet = 0
        while not writers_done.is_set() or quiet < 6:
            asked = datetime.now(UTC)
            batch = await c.drain_pending(d)
            drained[d].extend((p, asked) for p in batch)
            quiet = 0 if batch else quiet + 1
            await asyncio.sleep(0.05)

    async def slow(h: Handout) -> None:
        await asyncio.sleep(0.01)

    first = [
        asyncio.create_task(consume_until(b, d, outs[d], done=lambda: False, body=slow, idle=30))
        for d in streamed
    ]
    drainers = [asyncio.create_task(drainer(d)) for d in drained_devs]
    writing = asyncio.create_task(writer())
    await asyncio.sleep(0.4)
    await asyncio.wait_for(b.close(), 15)  # the restart, mid-stream
    await asyncio.wait_for(asyncio.gather(*first, return_exceptions=True), 10)
    b2 = await env.open(prefetch=3)
    await asyncio.wait_for(writing, 20)
    second = [
        asyncio.create_task(consume_until(b2, d, outs[d], done=lambda: False, body=slow, idle=3))
        for d in streamed
    ]
    await asyncio.wait_for(asyncio.gather(*second, *drainers), 30)

    by_payload: dict[tuple[str, bytes], str] = {}
    kind_of: dict[str, str] = {}
    rollout_of: dict[str, str] = {}
    for kind, rollout in rollouts:
        for d, cid in zip(devices, rollout.command_ids, strict=True):
            by_payload[(d, (await a.get_command(cid)).payload)] = cid
            kind_of[cid] = kind
            rollout_of[cid] = rollout.rollout_id
    handed_by: dict[str, list[tuple[str, datetime]]] = {}
    for d in streamed:
        handed_by[d] = [(h.id, h.asked) for h in outs[d] if h.finished]
    for d in drained_devs:
        handed_by[d] = [(by_payload[(d, p)], asked) for p, asked in drained[d]]
    handed = {cid for d in devices for cid, _ in handed_by[d]}
    for d in devices:
        seq = [cid for cid, _ in handed_by[d]]
        assert_once(seq)
        numbers = [number((await a.get_command(cid)).payload) for cid in seq]
        # Confirmation commands become ready at confirmation: compare the others only.
        ordered = [n for n, cid in zip(numbers, seq, strict=True) if kind_of[cid] != "confirm"]
        assert ordered == sorted(ordered), (d, numbers)
        for cid, asked in handed_by[d]:
            r = rollout_of[cid]
            assert not (r in cancelled_at and cancelled_at[r] < asked), (
                f"{d}: a command of the cancelled rollout handed out after the cancel"
            )
            if kind_of[cid] == "confirm":
                assert r in confirmed_rollouts, f"{d}: an unconfirmed rollout's command"
    for kind, rollout in rollouts:
        summary = await a.rollout_summary(rollout.rollout_id)
        counts = {k: v for k, v in summary.counts.items() if v}
        got = await statuses(a, list(rollout.command_ids))
        mine = Counter(got.values())
        assert counts == dict(mine), (kind, counts, mine)
        for cid in rollout.command_ids:
            s = got[cid]
            if cid in handed:
                assert s == CommandStatus.DELIVERED, (kind, s)
            elif rollout.rollout_id in cancelled_at:
                assert s == CommandStatus.CANCELLED, (kind, s)
            elif kind == "typed":
                assert s == CommandStatus.SUPERSEDED, (kind, s)
            elif kind == "confirm" and rollout.rollout_id not in confirmed_rollouts:
                assert s == CommandStatus.AWAITING_CONFIRMATION, (kind, s)
            else:
                raise AssertionError(f"{kind} {cid} neither handed out nor ended: {s}")


# -- 6. several OS processes on one PostgreSQL or Redis index -----------------------------------

_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from datetime import UTC, datetime
    from amqp_queue import RabbitMQConfig, RabbitMQStore

    async def main(role, amqp, state, exchange, device, n):
        store = await RabbitMQStore.connect(
            amqp, state_url=state,
            config=RabbitMQConfig(exchange=exchange, relay_after=1.0, relay_interval=1.0,
                                  prefetch=4),
        )
        async with store:
            if role == "spammer":
                print("ready", flush=True)
                i = 0
                while True:
                    await store.enqueue(device, b"c:%d" % i, 600)
                    i += 1
            if role == "writer":
                for i in range(n):
                    cid = await store.enqueue_or_update(device, "sp", b"sp:%d" % i, 600)
                    print(json.dumps({"i": i, "id": cid}), flush=True)
                    if i % 4 == 0:
                        cid = await store.enqueue(device, b"plain:%d" % i, 600)
                        print(json.dumps({"plain": i, "id": cid}), flush=True)
                    await asyncio.sleep(0.004)
            else:
                async with store.consume(device) as stream:
                    it = stream.__aiter__()
                    while True:
                        asked = datetime.now(UTC).timestamp()
                        try:
                            c = await asyncio.wait_for(it.__anext__(), 4)
                        except (TimeoutError, StopAsyncIteration):
                            break
                        at = datetime.now(UTC).timestamp()
                        print(json.dumps({"id": c.id, "payload": c.payload.decode(),
                                          "asked": asked, "at": at}), flush=True)
                        await asyncio.sleep(0.005)

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5],
                     int(sys.argv[6])))
    """
)


_ROOT = str(Path(__file__).resolve().parent.parent)


async def _child(env: Env, role: str, device: str, n: int = 0) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        role,
        AMQP_URL,
        env.state_url,
        env.exchange,
        device,
        str(n),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=_ROOT,
    )


@pytest.fixture(params=["postgres", "redis"])
async def shared_env(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    async with test_adversarial_seams.env_on(request.param, tmp_path, "adv3.") as shared:
        yield shared


async def test_latest_wins_written_in_one_process_read_by_two_other_processes_and_drains(
    shared_env: Env,
) -> None:
    """A writer process replaces (device, "sp") 120 times, with plain commands between; a
    consumer process and this process (a drain loop, cancelling a few plain commands as it
    goes) read the device at once. Nothing is handed out twice; no reader gets an older
    setpoint after a newer one; no setpoint is handed out after a newer one was handed out
    anywhere (it was superseded by then); the last setpoint and every uncancelled plain
    command arrive; statuses agree."""
    import json

    env = shared_env
    device = env.device()
    main = await env.open(prefetch=4)
    await main.ensure_queue(device)
    n = 120
    writer = await _child(env, "writer", device, n)
    reader = await _child(env, "consumer", device)
    rng = _seeded()
    drained: list[tuple[bytes, float, float]] = []
    cancelled: dict[str, float] = {}

    async def drains() -> None:
        while writer.returncode is None:
            asked = datetime.now(UTC).timestamp()
            batch = await main.drain_pending(device)
            at = datetime.now(UTC).timestamp()
            drained.extend((p, asked, at) for p in batch)
            for p in await main.get_pending(device):
                if p.payload.startswith(b"plain:") and rng.random() < 0.2:
                    with suppress(CommandNotFound):
                        await main.cancel_command(p.id)
                        cancelled[p.id] = datetime.now(UTC).timestamp()
            await asyncio.sleep(rng.uniform(0.005, 0.05))

    draining = asyncio.create_task(drains())
    w_out, w_err = await asyncio.wait_for(writer.communicate(), 30)
    assert writer.returncode == 0, w_err.decode()[-2000:]
    await asyncio.wait_for(draining, 10)
    r_out, r_err = await asyncio.wait_for(reader.communicate(), 30)
    assert reader.returncode == 0, r_err.decode()[-2000:]
    tail = await drain_until_empty(main, device, rounds=2)
    now = datetime.now(UTC).timestamp()
    drained.extend((p, now, now) for p in tail)

    written = [json.loads(line) for line in w_out.decode().splitlines()]
    sp_ids = {w["i"]: w["id"] for w in written if "i" in w}
    plain_ids = {w["plain"]: w["id"] for w in written if "plain" in w}
    by_payload = {b"sp:%d" % i: cid for i, cid in sp_ids.items()}
    by_payload.update({b"plain:%d" % i: cid for i, cid in plain_ids.items()})
    consumed = [json.loads(line) for line in r_out.decode().splitlines()]
    # (id, payload, asked, at, who)
    events = [(c["id"], c["payload"].encode(), c["asked"], c["at"], "child") for c in consumed] + [
        (by_payload[p], p, asked, at, "main") for p, asked, at in drained
    ]
    assert_once([e[0] for e in events])
    for who in ("child", "main"):
        mine = [e[1] for e in events if e[4] == who]
        sp = [number(p) for p in mine if p.startswith(b"sp:")]
        assert sp == sorted(sp), f"{who}: an older setpoint after a newer one: {sp}"
        pl = [number(p) for p in mine if p.startswith(b"plain:")]
        assert pl == sorted(pl), f"{who}: plain out of order: {pl}"
    sp_events = sorted(
        ((number(e[1]), e[2], e[3], e[4]) for e in events if e[1].startswith(b"sp:")),
    )
    for k, (i, asked_i, _, who_i) in enumerate(sp_events):
        for j, _, at_j, who_j in sp_events[k + 1 :]:
            assert asked_i < at_j + 0.05, (
                f"sp:{i} ({who_i}) asked for after sp:{j} ({who_j}) had been handed out"
            )
    handed = {e[0] for e in events}
    assert sp_ids[n - 1] in handed, "the last setpoint never came"
    assert set(plain_ids.values()) - set(cancelled) <= handed, "a plain command was lost"
    stale = [e[1] for e in events if e[0] in cancelled and cancelled[e[0]] < e[2]]
    assert not stale, f"cancelled before it was asked for: {stale}"
    got = await statuses(main, list(sp_ids.values()) + list(plain_ids.values()))
    for cid, s in got.items():
        if cid in handed:
            assert s == CommandStatus.DELIVERED, s
        elif cid in cancelled:
            assert s == CommandStatus.CANCELLED, s
        else:
            assert s == CommandStatus.SUPERSEDED, s
            assert cid in sp_ids.values(), s


# -- 7. drain_pending and consume on one device at once, cancels in between ----------------------


async def test_drains_and_a_stream_on_one_device_from_two_stores_with_cancels_between(
    env: Env,
) -> None:
    """Store B consumes a device (its body raises now and then: at-least-once), store C drains
    it in a loop, store A enqueues numbered commands (some with 1-2 s TTLs), cancels random
    open ones between drains and runs cleanup. Each command reaches the device once (a repeat
    only after a raised body, under the same id), in order within the stream and within each
    drain, nothing cancelled or expired before it was asked for; every uncancelled long-lived
    command arrives; statuses agree."""
    device = env.device()
    a = await env.open()
    b = await env.open(prefetch=3)
    c = await env.open(prefetch=3)
    rng = _seeded()
    n = 100
    ids: list[str] = []
    short: dict[str, datetime] = {}
    cancelled: dict[str, datetime] = {}
    drains: list[tuple[datetime, list[bytes]]] = []
    attempts: list[Handout] = []
    produced = asyncio.Event()

    class Flaky(Exception):
        pass

    async def producer() -> None:
        for i in range(n):
            ttl = rng.uniform(1.0, 2.0) if i % 5 == 0 else LONG
            ids.append(await a.enqueue(device, numbered(i), ttl))
            if ttl != LONG:
                short[ids[-1]] = datetime.now(UTC) + timedelta(seconds=ttl)
            if i % 6 == 0:
                for p in await a.get_pending(device):
                    if rng.random() < 0.15:
                        try:
                            await a.cancel_command(p.id)
                            cancelled[p.id] = datetime.now(UTC)
                        except CommandNotFound:
                            pass
                await a.cleanup()
            await asyncio.sleep(rng.uniform(0, 0.01))
        produced.set()

    async def drainer() -> None:
        while not produced.is_set():
            asked = datetime.now(UTC)
            drains.append((asked, await c.drain_pending(device)))
            await asyncio.sleep(rng.uniform(0, 0.03))

    async def body(h: Handout) -> None:
        await asyncio.sleep(0.005)
        if rng.random() < 0.1:
            raise Flaky

    async def streamer() -> None:
        while True:
            try:
                await consume_until(b, device, attempts, done=produced.is_set, body=body, idle=2)
                return
            except Flaky:
                continue

    tasks = [asyncio.create_task(f()) for f in (producer, drainer, streamer)]
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    asked = datetime.now(UTC)
    drains.append((asked, await drain_until_empty(c, device, rounds=2)))
    by_payload = {numbered(i): cid for i, cid in enumerate(ids)}
    finished = [h for h in attempts if h.finished]
    # A repeat only after a raised body: every id's attempts but the last did not finish.
    per_id: dict[str, list[Handout]] = {}
    for h in attempts:
        per_id.setdefault(h.id, []).append(h)
    for cid, tries in per_id.items():
        assert all(not t.finished for t in tries[:-1]), f"repeated after a finished body: {cid}"
    drained_ids = [by_payload[p] for _, batch in drains for p in batch]
    assert_once([h.id for h in finished] + drained_ids)
    # A command whose body raised went back to the queue: a drain may take it then.
    assert_ascending([h.payload for h in finished], "in the stream")
    for _, batch in drains:
        assert_ascending(batch, "within a drain")
    stale = [
        number(h.payload)
        for h in attempts
        if (h.id in cancelled and cancelled[h.id] < h.asked)
        or (h.id in short and short[h.id] <= h.asked)
    ]
    for asked_at, batch in drains:
        for p in batch:
            cid = by_payload[p]
            if (cid in cancelled and cancelled[cid] < asked_at) or (
                cid in short and short[cid] <= asked_at
            ):
                stale.append(number(p))
    assert not stale, f"stale commands handed out: {stale}"
    handed = {h.id for h in finished} | set(drained_ids)
    longs = [cid for cid in ids if cid not in short and cid not in cancelled]
    assert set(longs) <= handed, f"lost: {sorted(ids.index(c) for c in set(longs) - handed)}"
    got = await statuses(a, ids)
    for cid in ids:
        if cid in handed:
            assert got[cid] == CommandStatus.DELIVERED, (ids.index(cid), got[cid])
        elif cid in cancelled:
            assert got[cid] == CommandStatus.CANCELLED, (ids.index(cid), got[cid])
        else:
            assert cid in short, (ids.index(cid), got[cid])
            assert got[cid] == CommandStatus.EXPIRED, (ids.index(cid), got[cid])


# -- 8. an outcome deadline racing the gateway's report ------------------------------------------


async def test_outcome_reports_racing_the_deadline_sweep_agree_with_the_final_status(
    env: Env,
) -> None:
    """Commands with a short outcome deadline are consumed; right at their deadline store A
    reports success while store B runs cleanup (which times them out). Per command exactly
    one wins: a report that returned means SUCCEEDED (for good: a later sweep does not turn
    it into TIMED_OUT), a refused one (OutcomeRejected) means TIMED_OUT."""
    from amqp_queue import OutcomeRejected

    device = env.device()
    a = await env.open()
    b = await env.open()
    c = await env.open()
    rng = _seeded()
    n = 30
    ids = [await a.enqueue(device, numbered(i), LONG, outcome_timeout=0.4) for i in range(n)]
    out: list[Handout] = []
    await asyncio.wait_for(consume_until(c, device, out, done=lambda: len(out) >= n, idle=5), 15)
    assert [h.id for h in out] == ids
    delivered = await statuses(a, ids)
    assert set(delivered.values()) == {CommandStatus.DELIVERED}
    await asyncio.sleep(0.3)
    reported: dict[str, Any] = {}

    async def reporter() -> None:
        for cid in ids:
            try:
                await a.complete_command(cid, b"ok")
                reported[cid] = "ok"
            except OutcomeRejected as exc:
                reported[cid] = exc
            await asyncio.sleep(rng.uniform(0, 0.01))

    async def sweeper() -> None:
        for _ in range(40):
            await b.cleanup()
            await asyncio.sleep(rng.uniform(0, 0.01))

    await asyncio.wait_for(asyncio.gather(reporter(), sweeper()), 20)
    await b.cleanup()
    got = await statuses(a, ids)
    for cid in ids:
        if reported[cid] == "ok":
            assert got[cid] == CommandStatus.SUCCEEDED, (ids.index(cid), got[cid])
            await a.complete_command(cid, b"ok")  # harmless: raises nothing
            assert (await statuses(a, [cid]))[cid] == CommandStatus.SUCCEEDED
        else:
            assert got[cid] == CommandStatus.TIMED_OUT, (ids.index(cid), got[cid], reported[cid])


# -- 9. a store closed with enqueues in flight, another store already running -------------------


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.01])
def test_enqueues_racing_close_are_not_overtaken_by_another_running_store(
    env: Env, delay: float
) -> None:
    """Store A takes 30 concurrent enqueues for a device and is closed at once (no broker or
    network fault); store B, already running on the same state and exchange, enqueues the
    next command as soon as close() returns. Every command A accepted must reach the device
    before B's (never out of order per device), each once."""

    async def scenario() -> dict[str, Any]:
        device = env.device()
        b = await env.open()
        a = await env.open()
        await a.enqueue(device, numbered(0), LONG)
        calls = [asyncio.create_task(a.enqueue(device, numbered(i), LONG)) for i in range(1, 31)]
        await asyncio.sleep(delay)
        await asyncio.wait_for(a.close(), 10)
        await asyncio.wait(calls, timeout=10)
        accepted = [0] + [
            i + 1
            for i, c in enumerate(calls)
            if c.done() and not c.cancelled() and c.exception() is None
        ]
        await b.enqueue(device, numbered(99), LONG)
        got = await drain_everything(b, device)
        # Closed on this loop: the fixture's close would run on another, after this loop
        # closed, and the SQLite connection's thread would fail to answer into it.
        await asyncio.wait_for(b.close(), 10)
        env.stores.remove(a)
        env.stores.remove(b)
        return {"accepted": accepted, "got": [number(p) for p in got]}

    report = test_adversarial_seams.run_isolated(scenario, 60)
    got = report["got"]
    assert len(got) == len(set(got)), report
    assert set(report["accepted"]) | {99} <= set(got), report
    assert got == sorted(got), f"out of order: {got} (accepted {report['accepted']})"


# -- 12. confirm_rollout racing a replacing rollout of the same type ------------------------------


async def test_confirm_rollout_racing_a_replacing_rollout_never_approves_the_replacement(
    env: Env,
) -> None:
    """Rule 3 at fleet scale: rollout R1 (type "fw", needs confirmation) to 12 devices; store
    A confirms R1 as a whole while store B writes R2 (same type, needs confirmation) to the
    same devices, replacing R1's undelivered commands. R2's commands must all stay
    AWAITING_CONFIRMATION and never reach a device; R1's end DELIVERED (confirmed, then
    handed out) or SUPERSEDED; devices consume on store C."""
    a = await env.open()
    b = await env.open()
    c = await env.open()
    for round_ in range(4):
        devices = [env.device() for _ in range(12)]
        r1 = await a.enqueue_many(
            devices, b"r1:%d" % round_, LONG, command_type="fw", requires_confirmation=True
        )
        confirming = asyncio.create_task(a.confirm_rollout(r1.rollout_id))
        replacing = asyncio.create_task(
            b.enqueue_many(
                devices, b"r2:%d" % round_, LONG, command_type="fw", requires_confirmation=True
            )
        )
        confirmed = await asyncio.gather(confirming, return_exceptions=True)
        r2 = await replacing
        outs: dict[str, list[Handout]] = {dev: [] for dev in devices}
        await asyncio.wait_for(
            asyncio.gather(
                *(consume_until(c, dev, outs[dev], done=lambda: False, idle=1.0) for dev in devices)
            ),
            20,
        )
        handed = {h.id for o in outs.values() for h in o}
        assert not handed & set(r2.command_ids), f"round {round_}: an unconfirmed replacement"
        s1 = await statuses(a, list(r1.command_ids))
        s2 = await statuses(a, list(r2.command_ids))
        assert set(s2.values()) == {CommandStatus.AWAITING_CONFIRMATION}, (round_, s2)
        for cid, s in s1.items():
            want = CommandStatus.DELIVERED if cid in handed else CommandStatus.SUPERSEDED
            assert s == want, (round_, s, confirmed)
        summary = await a.rollout_summary(r2.rollout_id)
        assert summary.counts[CommandStatus.AWAITING_CONFIRMATION] == len(devices)
