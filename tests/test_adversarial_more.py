"""More adversarial scenarios on the public API of RabbitMQStore, over the real broker and every
state backend (SQLite, PostgreSQL, Redis): combinations tests/test_adversarial_seams.py does not
cover (latest-wins in a tight loop against consume and drains, rollouts confirmed and cancelled
while devices read, outcomes racing redelivery, retiring a device during a drain, per-device
limits under concurrent enqueues, ``recheck_after`` streams, close() with many streams and drains
running, cancelled confirms and cancels).

Only ``amqp_queue``'s public names are used to act; tests/ helpers set up and tear down.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from contextlib import suppress
from typing import Any

import pytest

from amqp_queue import (
    BrokerError,
    CommandNotFound,
    CommandStatus,
    Limits,
    OutcomeRejected,
    QueueFull,
    RabbitMQStore,
    StateError,
)
from tests import test_adversarial_seams
from tests.test_adversarial_seams import (
    LONG,
    Env,
    Handout,
    _seeded,
    assert_ascending,
    assert_once,
    consume_until,
    drain_until_empty,
    number,
    numbered,
    run_isolated,
    statuses,
)

# The seams' fixture: one state index (per backend) and one exchange that several stores share.
env = test_adversarial_seams.env
TRIALS = int(os.environ.get("AMQP_QUEUE_ADVERSARIAL_TRIALS", "5"))
"""Trials of a racing scenario that repeats one (the test command's short form; more for a
longer run)."""

pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


class _BodyFailed(Exception):
    pass


async def drain_while_pending(store: RabbitMQStore, device: str, ids: list[str]) -> list[bytes]:
    """Drains until none of ``ids`` is PENDING any more and two drains in a row were empty
    (commands awaiting confirmation stay open, so get_pending never empties)."""
    got: list[bytes] = []
    empty = 0
    async with asyncio.timeout(30):
        while True:
            batch = await store.drain_pending(device)
            got.extend(batch)
            empty = 0 if batch else empty + 1
            if empty >= 2:
                now = await statuses(store, ids)
                if CommandStatus.PENDING not in now.values():
                    return got
            if not batch:
                await asyncio.sleep(0.2)


# -- 1. latest-wins in a tight loop on one store, another store consuming ------------------------


@pytest.mark.parametrize("reader", ["consume", "drain"])
async def test_latest_wins_tight_loop_against_a_reader_on_another_store(
    env: Env, reader: str
) -> None:
    """Store A replaces (device, "sp") as fast as it can; store B consumes (or drains in a loop)
    the same device. B never gets an older setpoint after a newer one, nothing twice, and the
    last written ends delivered; every other one ends DELIVERED (handed out) or SUPERSEDED."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    n = 150
    written: list[str] = []
    out: list[Handout] = []
    drained: list[list[bytes]] = []
    stop = asyncio.Event()

    async def producer() -> None:
        for i in range(n):
            written.append(await a.enqueue_or_update(device, "sp", b"sp:%d" % i, LONG))
            if i % 25 == 0:
                await asyncio.sleep(0)
        stop.set()

    async def body(h: Handout) -> None:
        await asyncio.sleep(0.002)

    def consumed_last() -> bool:
        return stop.is_set() and bool(out) and out[-1].id == written[-1]

    async def drainer() -> None:
        async with asyncio.timeout(20):
            while True:
                batch = await b.drain_pending(device)
                drained.append(batch)
                if stop.is_set() and not await b.get_pending(device):
                    return
                await asyncio.sleep(0.001)

    if reader == "consume":
        reading = asyncio.create_task(
            consume_until(b, device, out, done=consumed_last, body=body, idle=5)
        )
    else:
        reading = asyncio.create_task(drainer())
    await asyncio.wait_for(producer(), 20)
    await asyncio.wait_for(reading, 20)
    by_payload = {b"sp:%d" % i: cid for i, cid in enumerate(written)}
    if reader == "consume":
        handed = [h.id for h in out]
    else:
        handed = [by_payload[p] for batch in drained for p in batch]
        handed += [by_payload[p] for p in await drain_until_empty(b, device, rounds=2)]
    assert_once(handed)
    order = [written.index(cid) for cid in handed]
    assert order == sorted(order), f"an older setpoint after a newer one: {order}"
    assert written[-1] in handed, f"the last setpoint was not handed out: {order[-5:]}"
    got = await statuses(a, written)
    wrong = {
        written.index(cid): s
        for cid, s in got.items()
        if s != (CommandStatus.DELIVERED if cid in handed else CommandStatus.SUPERSEDED)
    }
    assert not wrong, f"statuses disagree with the hand-outs: {wrong}"


# -- 2. rollouts: confirm_rollout and cancel_rollout racing consumers and drains ------------------


async def test_confirm_and_cancel_rollout_racing_consumers_and_drains(env: Env) -> None:
    """Rollouts requiring confirmation for 6 devices (3 consumed on store A, 3 drained on store
    B); store A confirms each rollout while store B cancels some of them a moment later. A
    command is handed out only if confirmed, at most once; every command ends DELIVERED
    (handed out) or CANCELLED (not handed out), and rollout_summary agrees."""
    rng = _seeded()
    devices = [env.device() for _ in range(6)]
    consumed, drained_devices = devices[:3], devices[3:]
    a = await env.open()
    b = await env.open()
    rollouts = [
        await a.enqueue_many(
            devices, b"r:%d" % r, LONG, command_type=f"fw{r}", requires_confirmation=True
        )
        for r in range(6)
    ]
    outs: dict[str, list[Handout]] = {d: [] for d in devices}
    drained: dict[str, list[bytes]] = {d: [] for d in devices}
    stop = asyncio.Event()
    counts: dict[int, int] = {}

    async def drainer(device: str) -> None:
        while not stop.is_set():
            drained[device].extend(await b.drain_pending(device))
            await asyncio.sleep(rng.uniform(0, 0.01))

    readers = [
        asyncio.create_task(
            consume_until(
                a, d, outs[d], done=stop.is_set, body=lambda h: asyncio.sleep(0.005), idle=3
            )
        )
        for d in consumed
    ] + [asyncio.create_task(drainer(d)) for d in drained_devices]
    to_cancel = set(rng.sample(range(6), 3))

    async def confirm(r: int) -> None:
        await asyncio.sleep(rng.uniform(0, 0.02))
        await a.confirm_rollout(rollouts[r].rollout_id)

    async def cancel(r: int) -> None:
        await asyncio.sleep(rng.uniform(0, 0.03))
        counts[r] = await b.cancel_rollout(rollouts[r].rollout_id)

    await asyncio.wait_for(
        asyncio.gather(*(confirm(r) for r in range(6)), *(cancel(r) for r in to_cancel)), 20
    )
    await asyncio.sleep(1.5)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*readers), 20)
    for d in drained_devices:
        drained[d].extend(await drain_until_empty(b, d, rounds=2))
    late: list[Handout] = []
    for d in consumed:
        await consume_until(b, d, late, done=lambda: False, idle=1)
    assert not late, f"left in consumed queues: {[(h.id, h.payload) for h in late]}"
    handed: list[str] = []
    for d in devices:
        ids_of = {
            b"r:%d" % r: rollouts[r].command_ids[devices.index(d)] for r in range(len(rollouts))
        }
        mine = [h.id for h in outs[d]] + [ids_of[p] for p in drained[d]]
        assert_once(mine)
        handed += mine
    every = [cid for r in rollouts for cid in r.command_ids]
    got = await statuses(a, every)
    for r, rollout in enumerate(rollouts):
        for cid in rollout.command_ids:
            if cid in handed:
                assert got[cid] == CommandStatus.DELIVERED, (r, cid, got[cid])
            elif r in to_cancel:
                assert got[cid] == CommandStatus.CANCELLED, (r, cid, got[cid])
            else:
                raise AssertionError(f"rollout {r} (not cancelled): {cid} lost, {got[cid]}")
        summary = await b.rollout_summary(rollout.rollout_id)
        assert summary.total == len(devices)
        expect = Counter(got[cid] for cid in rollout.command_ids)
        assert {k: v for k, v in summary.counts.items() if v} == dict(expect), (r, summary)


# -- 3. outcomes racing redelivery ----------------------------------------------------------------


async def test_an_outcome_reported_before_the_body_raised_is_never_handed_out_again(
    env: Env,
) -> None:
    """ReceivedCommand docs: a report proves the device took the command; should the body raise
    after it, the repeat is dropped. The next command comes instead, and the status stays
    SUCCEEDED."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    first = await a.enqueue(device, b"x:0", LONG)
    second = await a.enqueue(device, b"x:1", LONG)

    async def report_then_raise() -> None:
        async with a.consume(device) as stream:
            async for command in stream:
                assert command.id == first
                await command.complete(b"ok")
                raise _BodyFailed

    with pytest.raises(_BodyFailed):
        await report_then_raise()
    out: list[Handout] = []
    await asyncio.wait_for(consume_until(b, device, out, done=lambda: False, idle=2), 10)
    assert [h.id for h in out] == [second], [h.payload for h in out]
    assert await a.get_status(first) == CommandStatus.SUCCEEDED
    assert await a.get_status(second) == CommandStatus.DELIVERED


async def test_a_repeat_after_a_raised_body_keeps_the_outcome_reported_meanwhile(
    env: Env,
) -> None:
    """The body on store A raises (the command is requeued); store B's stream gets the repeat
    (at-least-once, same id). While B's body runs, the first gateway reports the outcome for
    the command it had (complete after its stream closed). B's body then finishes: the
    command must stay SUCCEEDED (its delivery mark must not undo the outcome), and a different
    outcome from B is refused."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    cid = await a.enqueue(device, b"x:0", LONG)
    kept: list[Any] = []

    async def keep_then_raise() -> None:
        async with a.consume(device) as stream:
            async for command in stream:
                kept.append(command)
                raise _BodyFailed

    with pytest.raises(_BodyFailed):
        await keep_then_raise()
    assert [c.id for c in kept] == [cid]
    refused: list[BaseException] = []
    repeat: list[str] = []
    async with b.consume(device) as stream:
        async for command in stream:
            repeat.append(command.id)
            # A's gateway reports while B's body runs.
            await kept[0].complete(b"done")
            try:
                await command.fail("b thinks it failed")
            except OutcomeRejected as exc:
                refused.append(exc)
            break
    # The repeat is allowed (the body raised before any report); it must be the same id.
    assert repeat in ([cid], []), repeat
    # B's delivery mark must have landed before the status is read: its stream's close
    # flushes it, bounded, and what a bound cut off the store owes and lands on close.
    await b.close()
    assert await a.get_status(cid) == CommandStatus.SUCCEEDED
    outcome = await a.get_outcome(cid)
    assert outcome is not None
    assert outcome.status == CommandStatus.SUCCEEDED
    if repeat:
        assert refused, "a different second outcome was accepted"


async def test_outcomes_racing_repeats_on_two_stores_under_load(env: Env) -> None:
    """Two stores consume one device; every body raises on its first attempt at a command
    (after completing it, for a third of them, which makes the repeat stale) and completes it
    on a later one. Each command ends SUCCEEDED; a command is never handed out after an outcome
    was recorded for it; the first hand-outs come in order."""
    rng = _seeded()
    device = env.device()
    a = await env.open(prefetch=5)
    b = await env.open(prefetch=5)
    n = 30
    ids = [await a.enqueue(device, numbered(i), LONG) for i in range(n)]
    attempts: Counter[str] = Counter()
    reported: dict[str, float] = {}
    late: list[tuple[str, float]] = []
    log: list[tuple[str, str]] = []

    async def run(store: RabbitMQStore, name: str) -> None:
        async with asyncio.timeout(25):
            while len(reported) < n:
                try:
                    async with store.consume(device) as stream:
                        iterator = stream.__aiter__()
                        while len(reported) < n:
                            try:
                                command = await asyncio.wait_for(iterator.__anext__(), 1.0)
                            except (TimeoutError, StopAsyncIteration):
                                break
                            now = time.monotonic()
                            if command.id in reported:
                                late.append((command.id, now - reported[command.id]))
                            log.append((name, command.id))
                            attempts[command.id] += 1
                            await asyncio.sleep(rng.uniform(0, 0.004))
                            if attempts[command.id] == 1:
                                if rng.random() < 0.33:
                                    await command.complete(name.encode())
                                    reported.setdefault(command.id, time.monotonic())
                                raise _BodyFailed
                            await command.complete(name.encode())
                            reported.setdefault(command.id, time.monotonic())
                except _BodyFailed:
                    pass

    await asyncio.wait_for(asyncio.gather(run(a, "a"), run(b, "b")), 30)
    # A repeat handed out after the report was committed (not merely in flight): stale.
    stale = [(ids.index(cid), round(dt, 3)) for cid, dt in late if dt > 0.05]
    assert not stale, f"handed out after their outcome was reported: {stale}"
    got = await statuses(a, ids)
    assert set(got.values()) == {CommandStatus.SUCCEEDED}, Counter(got.values())
    firsts: list[int] = []
    for _, cid in log:
        if ids.index(cid) not in firsts:
            firsts.append(ids.index(cid))
    assert sorted(firsts) == list(range(n))


# -- 4. retiring a device during a drain -----------------------------------------------------


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03])
async def test_retire_device_during_a_drain(env: Env, delay: float) -> None:
    """Store B drains 200 commands while store A retires the device. What the drain returned
    ends DELIVERED, the rest CANCELLED; nothing DELIVERED that nobody got; retire's count is at
    least the number CANCELLED; a command enqueued after the retire is delivered."""
    device = env.device()
    a = await env.open(prefetch=20)
    b = await env.open(prefetch=20)
    n = 200
    ids = [await a.enqueue(device, numbered(i), LONG) for i in range(n)]
    draining = asyncio.create_task(b.drain_pending(device))
    await asyncio.sleep(delay)
    retired = await a.retire_device(device)
    try:
        first = await asyncio.wait_for(draining, 15)
    except (BrokerError, StateError) as exc:
        print("the drain raised", repr(exc))
        first = []
    after = await a.enqueue(device, numbered(n), LONG)
    rest = await drain_until_empty(b, device, rounds=2)
    handed = first + rest
    assert len(handed) == len(set(handed)), "twice"
    assert_ascending(first, "in the drain")
    got = await statuses(a, ids)
    by_payload = {numbered(i): cid for i, cid in enumerate(ids)}
    handed_ids = {by_payload[p] for p in handed if p in by_payload}
    nobody = [
        i
        for i, cid in enumerate(ids)
        if got[cid] == CommandStatus.DELIVERED and cid not in handed_ids
    ]
    assert not nobody, (
        f"DELIVERED that nobody got: {nobody} (drain got {len(first)}, retired {retired})"
    )
    stale = [
        i for i, cid in enumerate(ids) if cid in handed_ids and got[cid] != CommandStatus.DELIVERED
    ]
    assert not stale, f"handed out but {[(i, got[ids[i]]) for i in stale]}"
    cancelled = [cid for cid in ids if got[cid] == CommandStatus.CANCELLED]
    assert len(cancelled) + len(handed_ids) == n
    assert len(cancelled) <= retired
    assert numbered(n) in rest, "the command enqueued after the retire was lost"
    assert await a.get_status(after) == CommandStatus.DELIVERED


async def test_retire_device_while_a_stream_is_open_then_new_commands_reach_a_new_stream(
    env: Env,
) -> None:
    """A consume stream on store B is open (body running on a command) when store A retires the
    device; the stream ends within a few seconds (it waited for ever for a next command, the
    broker's cancel of its consumer heard by nobody). Commands enqueued afterwards reach a new
    stream, once."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    ids = [await a.enqueue(device, numbered(i), LONG) for i in range(10)]
    out: list[Handout] = []
    started = asyncio.Event()

    async def body(h: Handout) -> None:
        started.set()
        await asyncio.sleep(0.2)

    consuming = asyncio.create_task(
        consume_until(b, device, out, done=lambda: False, body=body, idle=LONG)
    )
    await asyncio.wait_for(started.wait(), 10)
    retired = await a.retire_device(device)
    with suppress(BrokerError, StateError):
        await asyncio.wait_for(consuming, 5)
    later = [await a.enqueue(device, numbered(i), LONG) for i in range(10, 15)]
    again: list[Handout] = []
    await asyncio.wait_for(
        consume_until(b, device, again, done=lambda: len(again) >= 5, idle=5), 15
    )
    assert [h.id for h in again] == later, [h.payload for h in again]
    got = await statuses(a, ids + later)
    finished = [h.id for h in out if h.finished]
    for cid in ids:
        want = CommandStatus.DELIVERED if cid in finished else CommandStatus.CANCELLED
        if cid in [h.id for h in out] and cid not in finished:
            # handed out, body interrupted by the retire: the device had it in hand
            assert got[cid] in (CommandStatus.DELIVERED, CommandStatus.CANCELLED), got[cid]
            continue
        assert got[cid] == want, (ids.index(cid), got[cid], retired)
    for cid in later:
        assert got[cid] == CommandStatus.DELIVERED


# -- 5. per-device limits under concurrent enqueues ----------------------------------------------


async def test_queue_full_under_concurrent_enqueues_on_two_stores(env: Env) -> None:
    """max_pending_per_device=8; two stores fire 20 concurrent enqueues each (plain, latest-wins
    of two types, and 2-device rollouts) at one device. Exactly 8 open commands at most, every
    refused call wrote nothing, and every accepted command is delivered once."""
    limits = Limits(max_pending_per_device=8)
    device = env.device()
    other = env.device()
    a = await env.open(limits=limits)
    b = await env.open(limits=limits)
    accepted: dict[str, bytes] = {}
    refused = 0
    rollout_ids: list[str] = []

    async def call(store: RabbitMQStore, k: int) -> None:
        nonlocal refused
        payload = numbered(k)
        try:
            if k % 4 == 0:
                cid = await store.enqueue_or_update(device, f"t{k % 8}", payload, LONG)
            elif k % 4 == 1:
                rollout = await store.enqueue_many([other, device], payload, LONG)
                rollout_ids.append(rollout.rollout_id)
                accepted[rollout.command_ids[0]] = payload
                cid = rollout.command_ids[1]
            else:
                cid = await store.enqueue(device, payload, LONG)
            accepted[cid] = payload
        except QueueFull:
            refused += 1

    await asyncio.wait_for(asyncio.gather(*(call(a if k % 2 else b, k) for k in range(40))), 20)
    pending = await a.get_pending(device)
    assert len(pending) <= 8, len(pending)
    assert {p.id for p in pending} <= set(accepted)
    got = await statuses(a, list(accepted))
    open_ids = {
        cid
        for cid, s in got.items()
        if s == CommandStatus.PENDING and cid in {p.id for p in pending}
    }
    superseded = {cid for cid, s in got.items() if s == CommandStatus.SUPERSEDED}
    device_ids = {cid for cid in accepted if cid in {p.id for p in pending} or cid in superseded}
    assert refused > 0
    # Nothing the refused calls attempted is in the index: the device's history holds only
    # accepted ids.
    history = await a.device_history(device, limit=1000)
    assert {r.id for r in history} <= set(accepted), "a refused call wrote something"
    other_history = await a.device_history(other, limit=1000)
    assert {r.id for r in other_history} <= set(accepted), "a refused rollout wrote something"
    drained = await drain_until_empty(b, device, rounds=2)
    assert len(drained) == len(set(drained))
    assert sorted(drained) == sorted(accepted[cid] for cid in open_ids)
    assert device_ids >= open_ids
    # freed: now 8 more fit
    for i in range(8):
        await a.enqueue(device, numbered(100 + i), LONG)
    with pytest.raises(QueueFull):
        await b.enqueue(device, numbered(200), LONG)


async def test_queue_full_while_a_consumer_frees_slots(env: Env) -> None:
    """Limit 5; a producer on store A retries on QueueFull while store B consumes: every
    accepted command arrives once, in order, and no refused one ever arrives."""
    limits = Limits(max_pending_per_device=5)
    device = env.device()
    a = await env.open(limits=limits)
    b = await env.open(limits=limits)
    n = 60
    accepted: list[int] = []
    refusals = 0
    out: list[Handout] = []
    done = asyncio.Event()

    async def producer() -> None:
        nonlocal refusals
        i = 0
        while i < n:
            try:
                await a.enqueue(device, numbered(i), LONG)
                accepted.append(i)
            except QueueFull:
                refusals += 1
                await asyncio.sleep(0.002)
            i += 1
        done.set()

    consuming = asyncio.create_task(
        consume_until(
            b,
            device,
            out,
            done=lambda: done.is_set() and len(out) >= len(accepted),
            body=lambda h: asyncio.sleep(0.004),
            idle=4,
        )
    )
    await asyncio.wait_for(producer(), 20)
    await asyncio.wait_for(consuming, 20)
    got = [number(h.payload) for h in out]
    assert got == accepted, (got, accepted, refusals)


# -- 6. recheck_after streams with cancels during the loop body -----------------------------------


@pytest.mark.parametrize("recheck", [0.05, 0.3])
async def test_recheck_after_cancel_during_the_body(env: Env, recheck: float) -> None:
    """recheck_after=R: a command cancelled less than R before the device asked may still be
    handed out (and then ends DELIVERED); one cancelled more than R (plus a margin) before it
    never is. Whatever was handed out is DELIVERED, the rest CANCELLED, nothing lost."""
    rng = _seeded()
    device = env.device()
    a = await env.open(recheck_after=recheck)
    b = await env.open()
    n = 60
    ids = [await a.enqueue(device, numbered(i), LONG) for i in range(n)]
    cancelled_at: dict[str, float] = {}
    refused: set[str] = set()
    out: list[Handout] = []
    asked_at: dict[str, float] = {}

    async def body(h: Handout) -> None:
        asked_at[h.id] = time.monotonic()
        # Cancel a few commands further down the queue while this body runs.
        later = ids[ids.index(h.id) + 1 :]
        for cid in rng.sample(later, min(len(later), rng.choice([0, 0, 1, 2]))):
            if cid in cancelled_at or cid in refused:
                continue
            try:
                await b.cancel_command(cid)
                cancelled_at[cid] = time.monotonic()
            except CommandNotFound:
                refused.add(cid)
        await asyncio.sleep(rng.uniform(0, 2 * recheck) if rng.random() < 0.3 else 0.002)

    await asyncio.wait_for(
        consume_until(
            a, device, out, done=lambda: out[-1].id == ids[-1] if out else False, body=body, idle=3
        ),
        25,
    )
    handed = [h.id for h in out]
    assert_once(handed)
    assert_ascending([h.payload for h in out])
    # a cancelled command handed out must have been cancelled within recheck of the hand-out
    old_cancels = [
        (ids.index(cid), round(asked_at[cid] - cancelled_at[cid], 3))
        for cid in handed
        if cid in cancelled_at and asked_at[cid] - cancelled_at[cid] > recheck + 0.1
    ]
    assert not old_cancels, f"cancelled long before the hand-out, still handed out: {old_cancels}"
    assert refused <= set(handed)
    await asyncio.sleep(0.3)
    got = await statuses(a, ids)
    for cid in ids:
        want = CommandStatus.DELIVERED if cid in handed else CommandStatus.CANCELLED
        assert got[cid] == want, (ids.index(cid), got[cid], cid in cancelled_at)
        if cid not in handed:
            assert cid in cancelled_at, f"{ids.index(cid)} lost"


# -- 7. close() with many streams and drains running, a new store delivers the rest ------------


@pytest.mark.parametrize("when", [0.02, 0.15])
def test_close_with_many_streams_and_drains_then_a_new_store_delivers_the_rest_once(
    env: Env, when: float
) -> None:
    """Store A runs 4 consume streams and 4 looping drains over 8 devices (plus a second
    drain per drained device from the same store) while it enqueues more; it is closed at a
    random moment. Store B then takes what is left. Each command is handed out once (a consume
    body interrupted by the close may see it again, same id), in order per device; nothing is
    DELIVERED that nobody got."""

    async def scenario() -> dict[str, Any]:
        rng = _seeded()
        devices = [env.device() for _ in range(8)]
        a = await env.open(prefetch=10)
        ids: dict[str, list[str]] = {d: [] for d in devices}
        for d in devices:
            for i in range(30):
                ids[d].append(await a.enqueue(d, numbered(i), LONG))
        outs: dict[str, list[Handout]] = {d: [] for d in devices}
        drained: dict[str, list[bytes]] = {d: [] for d in devices}
        errors: list[str] = []

        closing = asyncio.Event()

        async def drainer(d: str) -> None:
            # A call on a closed store waits publish_timeout (10 s) before its BrokerError:
            # the loop stops starting new drains once close() began.
            while not closing.is_set():
                try:
                    drained[d].extend(await a.drain_pending(d))
                except Exception as exc:  # closed store: the loop ends
                    errors.append(repr(exc))
                    return
                await asyncio.sleep(rng.uniform(0, 0.01))

        async def producer() -> None:
            for i in range(30, 45):
                for d in devices:
                    if closing.is_set():
                        return
                    try:
                        ids[d].append(await a.enqueue(d, numbered(i), LONG))
                    except Exception as exc:
                        errors.append(repr(exc))
                        return
                await asyncio.sleep(0.002)

        tasks = [
            asyncio.create_task(
                consume_until(
                    a,
                    d,
                    outs[d],
                    done=lambda: False,
                    body=lambda h: asyncio.sleep(rng.uniform(0, 0.01)),
                    idle=30,
                )
            )
            for d in devices[:4]
        ]
        tasks += [asyncio.create_task(drainer(d)) for d in devices[4:] for _ in range(2)]
        producing = asyncio.create_task(producer())
        await asyncio.sleep(when + rng.uniform(0, 0.05))
        closing.set()
        await asyncio.wait_for(a.close(), 20)
        done, pending = await asyncio.wait([*tasks, producing], timeout=10)
        hung = len(pending)
        for t in pending:
            t.cancel()
        for t in tasks:
            if t in done and not t.cancelled() and t.exception() is not None:
                errors.append(repr(t.exception()))
        b = await env.open()
        rest: dict[str, list[bytes]] = {}
        for d in devices:
            got: list[bytes] = []
            async with asyncio.timeout(20):
                while True:
                    got.extend(await b.drain_pending(d))
                    if not await b.get_pending(d):
                        break
                    await asyncio.sleep(0.2)
            got.extend(await drain_until_empty(b, d, rounds=2))
            rest[d] = got
        report: dict[str, Any] = {"hung": hung, "errors": errors[:5], "problems": []}
        for d in devices:
            finished = [h.payload for h in outs[d] if h.finished]
            first = finished + drained[d]
            every = first + rest[d]
            st = await statuses(b, ids[d])
            by_payload = {numbered(i): cid for i, cid in enumerate(ids[d])}
            if len(every) != len(set(every)):
                report["problems"].append(
                    (d, "twice", sorted(p for p, c in Counter(every).items() if c > 1))
                )
            accepted = {numbered(i) for i in range(len(ids[d]))}
            if not accepted <= set(every):
                report["problems"].append((d, "lost", sorted(accepted - set(every))))
            seen_all = set(every) | {h.payload for h in outs[d]}
            nobody = [
                p
                for p, cid in by_payload.items()
                if st[cid] == CommandStatus.DELIVERED and p not in seen_all
            ]
            if nobody:
                report["problems"].append((d, "delivered to nobody", nobody))
            if [number(p) for p in rest[d]] != sorted(number(p) for p in rest[d]):
                report["problems"].append((d, "rest out of order", rest[d]))
        await b.close()
        return report

    report = run_isolated(scenario, 80)
    assert report["hung"] == 0, report
    assert not report["problems"], report


# -- 8. cancelled confirm_command and cancel_command calls -------------------------------------


async def test_cancelled_confirms_and_cancels_leave_statuses_that_agree_with_delivery(
    env: Env,
) -> None:
    """Confirmation commands on one device; confirm_command and cancel_command tasks on two
    stores are cancelled at random moments while store C drains. Afterwards every command is
    DELIVERED exactly when handed out, the rest AWAITING_CONFIRMATION or CANCELLED; a command
    whose confirm returned and that no cancel touched is handed out; a command whose cancel
    returned is never handed out."""
    rng = _seeded()
    device = env.device()
    a = await env.open()
    b = await env.open()
    c = await env.open()
    n = 60
    ids = [await a.enqueue_with_confirmation(device, f"t{i}", numbered(i), LONG) for i in range(n)]
    confirmed: set[str] = set()
    cancelled: set[str] = set()
    touched_by_cancel: set[str] = set()
    drained: list[bytes] = []
    stop = asyncio.Event()

    async def drainer() -> None:
        while not stop.is_set():
            drained.extend(await c.drain_pending(device))
            await asyncio.sleep(0.003)

    async def act(cid: str) -> None:
        store = a if rng.random() < 0.5 else b
        if rng.random() < 0.3:
            touched_by_cancel.add(cid)
            task = asyncio.create_task(store.cancel_command(cid))
            done_set = cancelled
        else:
            task = asyncio.create_task(store.confirm_command(cid))
            done_set = confirmed
        if rng.random() < 0.5:
            await asyncio.sleep(rng.uniform(0, 0.004))
            task.cancel()
        try:
            await task
            done_set.add(cid)
        except (asyncio.CancelledError, CommandNotFound):
            pass

    draining = asyncio.create_task(drainer())
    await asyncio.wait_for(asyncio.gather(*(act(cid) for cid in ids)), 20)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(draining, 20)
    # relay_after is 1 s: a confirm committed after its caller was cancelled is owed
    drained.extend(await drain_while_pending(c, device, ids))
    by_payload = {numbered(i): cid for i, cid in enumerate(ids)}
    handed = [by_payload[p] for p in drained]
    assert_once(handed)
    assert not set(handed) & cancelled, "a command whose cancel returned was handed out"
    missing = confirmed - touched_by_cancel - set(handed)
    assert not missing, (
        f"confirmed, never cancelled, not handed out: {[ids.index(c) for c in missing]}"
    )
    got = await statuses(a, ids)
    for cid in ids:
        if cid in handed:
            assert got[cid] == CommandStatus.DELIVERED, (ids.index(cid), got[cid])
        else:
            assert got[cid] in (CommandStatus.AWAITING_CONFIRMATION, CommandStatus.CANCELLED), (
                ids.index(cid),
                got[cid],
            )
            if cid in cancelled:
                assert got[cid] == CommandStatus.CANCELLED


# -- 9. latest-wins on two writers, a consumer and a drainer on a third and fourth store ------


async def test_latest_wins_and_confirmation_of_one_type_mixed_while_consumed(env: Env) -> None:
    """enqueue_or_update and enqueue_with_confirmation of the same (device, type) interleave on
    two stores; every confirmation command is confirmed right after (by the other store) or
    not. Consumer on store C. Never an unconfirmed command handed out, never an older one after
    a newer one, and the last command ends delivered, or awaiting confirmation if it needed one
    and was not confirmed."""
    rng = _seeded()
    device = env.device()
    a = await env.open()
    b = await env.open()
    c = await env.open()
    n = 80
    written: list[tuple[str, bool, bool]] = []  # id, needs confirmation, confirm returned
    out: list[Handout] = []
    finished = asyncio.Event()

    async def producer() -> None:
        for i in range(n):
            store, other = (a, b) if i % 2 else (b, a)
            if rng.random() < 0.4:
                cid = await store.enqueue_with_confirmation(device, "sp", b"sp:%d" % i, LONG)
                ok = False
                if rng.random() < 0.7:
                    try:
                        await other.confirm_command(cid)
                        ok = True
                    except CommandNotFound:
                        pass
                written.append((cid, True, ok))
            else:
                written.append(
                    (await store.enqueue_or_update(device, "sp", b"sp:%d" % i, LONG), False, False)
                )
            await asyncio.sleep(rng.uniform(0, 0.004))
        finished.set()

    consuming = asyncio.create_task(
        consume_until(
            c, device, out, done=lambda: False, body=lambda h: asyncio.sleep(0.003), idle=2.5
        )
    )
    await asyncio.wait_for(producer(), 20)
    await asyncio.wait_for(consuming, 25)
    order = {cid: k for k, (cid, _, _) in enumerate(written)}
    handed = [h.id for h in out]
    assert_once(handed)
    seq = [order[cid] for cid in handed]
    assert seq == sorted(seq), f"older after newer: {seq}"
    for cid in handed:
        _, needs, ok = written[order[cid]]
        assert not needs or ok, f"unconfirmed command {order[cid]} handed out"
    got = await statuses(a, [w[0] for w in written])
    last_id, last_needs, last_ok = written[-1]
    if last_needs and not last_ok:
        assert got[last_id] == CommandStatus.AWAITING_CONFIRMATION
    else:
        assert last_id in handed, (got[last_id], seq[-5:])
    for cid, needs, ok in written:
        if cid in handed:
            assert got[cid] == CommandStatus.DELIVERED
        elif cid != last_id:
            assert got[cid] == CommandStatus.SUPERSEDED, (order[cid], got[cid], needs, ok)


# -- 10. retiring a device while drains on another store are cancelled at random ---------------


async def test_retire_device_racing_cancelled_drains(env: Env) -> None:
    """Store B drains one device in tasks cancelled at random (each cancelled drain gives back
    what it claimed) while store A retires the device. Afterwards every command is DELIVERED
    exactly when a drain returned it, the rest CANCELLED, or still open and then delivered by
    a later drain: none PENDING with nothing to deliver it, none DELIVERED to nobody."""
    rng = _seeded()
    device = env.device()
    a = await env.open(prefetch=10)
    b = await env.open(prefetch=10)
    n = 120
    ids = [await a.enqueue(device, numbered(i), LONG) for i in range(n)]
    results: list[list[bytes]] = []
    errors: list[str] = []
    retired: list[int] = []

    async def retire() -> None:
        await asyncio.sleep(rng.uniform(0.01, 0.08))
        retired.append(await a.retire_device(device))

    retiring = asyncio.create_task(retire())
    async with asyncio.timeout(20):
        while not retiring.done():
            task = asyncio.create_task(b.drain_pending(device))
            await asyncio.sleep(rng.uniform(0, 0.02))
            if rng.random() < 0.6:
                task.cancel()
            try:
                results.append(await task)
            except asyncio.CancelledError:
                pass
            except (BrokerError, StateError) as exc:
                errors.append(repr(exc))
    await retiring
    try:
        results.append(await drain_until_empty(b, device, rounds=3, errors=errors))
    except TimeoutError:
        pending = await b.get_pending(device)
        raise AssertionError(
            f"open with nothing to deliver them: {[number(p.payload) for p in pending]}; "
            f"retired {retired}; {errors}"
        ) from None
    flat = [p for r in results for p in r]
    assert len(flat) == len(set(flat)), "twice"
    by_payload = {numbered(i): cid for i, cid in enumerate(ids)}
    handed = {by_payload[p] for p in flat}
    got = await statuses(a, ids)
    bad = {
        i: got[cid]
        for i, cid in enumerate(ids)
        if got[cid] != (CommandStatus.DELIVERED if cid in handed else CommandStatus.CANCELLED)
    }
    assert not bad, f"statuses disagree with the drains (retired {retired}): {bad}; {errors}"


# -- 11. two consumers on two stores, latest-wins from a third ---------------------------------


async def test_two_consumers_never_hand_out_an_older_setpoint_after_a_newer_one(env: Env) -> None:
    """Consumers on stores A and B (the broker round-robins between them) and a producer
    replacing one type on store C: a consumer never hands out setpoint k once it asked for its
    next command after setpoint j > k had been handed out (k was superseded before j was even
    published). The last written ends delivered, statuses agree, nothing twice."""
    device = env.device()
    a = await env.open(prefetch=20)
    b = await env.open(prefetch=20)
    c = await env.open()
    n = 120
    written: list[str] = []
    outs: dict[str, list[Handout]] = {"a": [], "b": []}
    finished = asyncio.Event()

    async def producer() -> None:
        for i in range(n):
            written.append(await c.enqueue_or_update(device, "sp", b"sp:%d" % i, LONG))
            if i % 10 == 0:
                await asyncio.sleep(0.002)
        finished.set()

    def got_last() -> bool:
        return finished.is_set() and any(h.id == written[-1] for o in outs.values() for h in o)

    consumers = [
        asyncio.create_task(
            consume_until(
                s, device, outs[k], done=got_last, body=lambda h: asyncio.sleep(0.001), idle=3
            )
        )
        for k, s in (("a", a), ("b", b))
    ]
    await asyncio.wait_for(producer(), 20)
    await asyncio.wait_for(asyncio.gather(*consumers), 20)
    every = [h for o in outs.values() for h in o]
    assert_once([h.id for h in every])
    index = {cid: i for i, cid in enumerate(written)}
    for key, o in outs.items():
        seq = [index[h.id] for h in o]
        assert seq == sorted(seq), f"consumer {key}: {seq}"
    stale = [
        (index[old.id], index[new.id])
        for old in every
        for new in every
        if index[old.id] < index[new.id] and old.asked > new.at
    ]
    assert not stale, f"an older setpoint handed out after a newer one was: {stale[:10]}"
    assert written[-1] in {h.id for h in every}
    got = await statuses(a, written)
    handed = {h.id for h in every}
    bad = {
        index[cid]: s
        for cid, s in got.items()
        if s != (CommandStatus.DELIVERED if cid in handed else CommandStatus.SUPERSEDED)
    }
    assert not bad, bad


# -- 12. a command in hand cancelled, replaced or expired, then its outcome reported ------------


@pytest.mark.parametrize("how", ["cancelled", "replaced", "expired", "rollout-cancelled"])
async def test_an_outcome_for_a_command_taken_away_while_in_hand_is_kept(
    env: Env, how: str
) -> None:
    """Rule 5 and ReceivedCommand: the device has the command; whatever cancelled, replaced
    or expired it while the body ran, the report is kept (SUCCEEDED), and nothing comes
    again."""
    device = env.device()
    a = await env.open()
    b = await env.open()
    if how == "rollout-cancelled":
        rollout = await a.enqueue_many([device], b"x:0", LONG, command_type="sp")
        cid = rollout.command_ids[0]
    else:
        cid = await a.enqueue_or_update(device, "sp", b"x:0", 1.0 if how == "expired" else LONG)
    follower = await a.enqueue(device, b"x:1", LONG)
    replacement: list[str] = []
    out: list[str] = []
    async with a.consume(device) as stream:
        async for command in stream:
            out.append(command.id)
            if command.id != cid:
                break
            if how == "cancelled":
                with suppress(CommandNotFound):
                    await b.cancel_command(cid)
            elif how == "replaced":
                replacement.append(await b.enqueue_or_update(device, "sp", b"x:2", LONG))
            elif how == "rollout-cancelled":
                await b.cancel_rollout(rollout.rollout_id)
            else:
                await asyncio.sleep(1.2)
                await b.cleanup()
            await command.complete(b"done")
    rest: list[Handout] = []
    await consume_until(b, device, rest, done=lambda: False, idle=1.5)
    assert out == [cid, follower], out
    assert [h.id for h in rest] == replacement, [h.payload for h in rest]
    assert await a.get_status(cid) == CommandStatus.SUCCEEDED
    outcome = await b.get_outcome(cid)
    assert outcome is not None
    assert outcome.result == b"done"


# -- 13. latest-wins calls cancelled at random ------------------------------------------------


async def test_cancelled_latest_wins_calls_never_let_an_older_call_win(env: Env) -> None:
    """One caller replaces (device, "sp") again and again on store A, cancelling a third of
    its calls at a random moment; store B consumes. The device never gets a setpoint of an
    earlier call after one of a later call, and the command left open (or handed out last) is
    the one of the latest call that reached the index: an earlier, cancelled call's write never
    lands after a later call's."""
    rng = _seeded()
    device = env.device()
    a = await env.open()
    b = await env.open()
    n = 80
    returned: dict[int, str] = {}
    out: list[Handout] = []
    finished = asyncio.Event()

    async def producer() -> None:
        for i in range(n):
            call = asyncio.create_task(a.enqueue_or_update(device, "sp", b"sp:%d" % i, LONG))
            if rng.random() < 0.33:
                await asyncio.sleep(rng.uniform(0, 0.003))
                call.cancel()
            with suppress(asyncio.CancelledError):
                returned[i] = await call
        finished.set()

    consuming = asyncio.create_task(
        consume_until(
            b, device, out, done=lambda: False, body=lambda h: asyncio.sleep(0.002), idle=3
        )
    )
    await asyncio.wait_for(producer(), 20)
    await asyncio.wait_for(consuming, 25)
    seq = [number(h.payload) for h in out]
    assert len(seq) == len(set(seq)), seq
    assert seq == sorted(seq), f"an earlier call's setpoint after a later one's: {seq}"
    last_returned = max(returned)
    # The highest call that reached the index: handed out last or still pending.
    pending = await a.get_pending(device)
    assert not pending, [p.payload for p in pending]
    assert seq, "nothing handed out"
    assert seq[-1] >= last_returned, f"last handed {seq[-1]}, last returned call {last_returned}"
    got = await statuses(a, list(returned.values()))
    for i, cid in returned.items():
        want = CommandStatus.DELIVERED if i in seq else CommandStatus.SUPERSEDED
        assert got[cid] == want, (i, got[cid])


# -- 14. latest-wins rollouts on two stores, consumed ------------------------------------------


async def test_latest_wins_rollouts_from_two_stores_while_devices_consume(env: Env) -> None:
    """Typed rollouts (enqueue_many with command_type) to 5 devices from stores A and B in
    turn, while each device consumes on store C: per device, never an older rollout after a
    newer one, the last rollout reaches every device, and each rollout_summary counts only
    DELIVERED and SUPERSEDED."""
    devices = [env.device() for _ in range(5)]
    a = await env.open()
    b = await env.open()
    c = await env.open()
    rollouts = []
    outs: dict[str, list[Handout]] = {d: [] for d in devices}
    finished = asyncio.Event()
    n = 25

    async def producer() -> None:
        for r in range(n):
            store = a if r % 2 else b
            rollouts.append(
                await store.enqueue_many(devices, b"fw:%d" % r, LONG, command_type="fw")
            )
            await asyncio.sleep(0.003)
        finished.set()

    def last_in(d: str) -> Any:
        return lambda: finished.is_set() and any(h.payload == b"fw:%d" % (n - 1) for h in outs[d])

    consumers = [
        asyncio.create_task(
            consume_until(
                c, d, outs[d], done=last_in(d), body=lambda h: asyncio.sleep(0.004), idle=4
            )
        )
        for d in devices
    ]
    await asyncio.wait_for(producer(), 20)
    await asyncio.wait_for(asyncio.gather(*consumers), 20)
    for d in devices:
        seq = [number(h.payload) for h in outs[d]]
        assert seq == sorted(seq), (d, seq)
        assert len(seq) == len(set(seq)), (d, seq)
        assert seq[-1] == n - 1, (d, seq)
    handed = {h.id for o in outs.values() for h in o}
    for r, rollout in enumerate(rollouts):
        summary = await a.rollout_summary(rollout.rollout_id)
        want = Counter(
            CommandStatus.DELIVERED if cid in handed else CommandStatus.SUPERSEDED
            for cid in rollout.command_ids
        )
        assert {k: v for k, v in summary.counts.items() if v} == dict(want), (r, summary)


# -- 15. minimal: a drain cancelled as the device is retired, while it held its claim ----------


async def test_a_drain_cancelled_as_its_device_is_retired_leaves_no_command_pending_for_ever(
    env: Env,
) -> None:
    """Minimal form of test_retire_device_racing_cancelled_drains, in ``TRIALS`` trials of one
    device each. Store B's drain has claimed its first window (every command of it DELIVERED;
    drain_idle keeps it waiting for more); store A retires the device and B's drain is
    cancelled at the same moment. Retiring deletes the queue and cancels the open commands
    (not the claimed ones: DELIVERED then); the cancelled drain then gives its claims back
    (open again, "requeued") into a queue that no longer exists. The claimed commands must end
    CANCELLED, or be delivered by a later drain: none may stay PENDING with no message and
    nothing owing it."""
    a = await env.open()
    b = await env.open(prefetch=10)
    report = []
    rng = _seeded()
    for trial in range(TRIALS):
        device = env.device()
        ids = [await a.enqueue(device, numbered(i), LONG) for i in range(40)]
        draining = asyncio.create_task(b.drain_pending(device))
        async with asyncio.timeout(10):
            while CommandStatus.DELIVERED not in (await statuses(a, ids[:10])).values():  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        retiring = asyncio.create_task(a.retire_device(device))
        # The drain's claims and the retire's queue delete and index step race; cancelled
        # while it claims, the drain gives back what it claimed (after the retire, in the
        # trials that fail).
        await asyncio.sleep(rng.uniform(0, 0.01))
        draining.cancel()
        got: list[bytes] = []
        with suppress(asyncio.CancelledError):
            got.extend(await draining)
        retired = await retiring
        async with asyncio.timeout(15):
            for _ in range(6):  # relay_after and relay_interval are 1 s
                got.extend(await b.drain_pending(device))
                await asyncio.sleep(0.25)
        after = await statuses(a, ids)
        report.append((trial, retired, len(got), dict(Counter(s.value for s in after.values()))))
        stuck = [i for i, cid in enumerate(ids) if after[cid] == CommandStatus.PENDING]
        if stuck:
            # Longer than relay_after (1 s) and a relay pass: still nothing delivers them.
            await asyncio.sleep(4)
            got.extend(await b.drain_pending(device))
            pending = [number(p.payload) for p in await b.get_pending(device)]
            raise AssertionError(
                f"PENDING with no message: {stuck}; 4 s later a drain got {got}, the index "
                f"still holds {pending} pending; trials (trial, retired, got, statuses): {report}"
            )
    print(report)
