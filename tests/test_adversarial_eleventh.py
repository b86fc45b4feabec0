"""Eleventh adversarial round: outcomes, fan-out, retiring and limits across stores.

Public API only (``amqp_queue``'s ``__all__`` and RabbitMQStore's methods), on every state
index, over the real broker. Each scenario judges a documented promise: an outcome is never
lost nor overwritten by a timeout, a reported command never reads PENDING again, rollout
counts agree with the statuses, a retired device's commands end CANCELLED while later ones
are still delivered, and ``max_pending_per_device`` holds across stores.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import suppress
from pathlib import Path

import pytest

from amqp_queue import (
    CommandStatus,
    Limits,
    OutcomeRejected,
    QueueFull,
    RabbitMQStore,
)
from tests.support import matrix, seeded
from tests.test_adversarial_ninth import space_on
from tests.test_adversarial_seams import BACKENDS

pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

RECEIVED_STATUSES = {
    CommandStatus.DELIVERED,
    CommandStatus.SUCCEEDED,
    CommandStatus.FAILED,
    CommandStatus.TIMED_OUT,
}


async def consume_n(store: RabbitMQStore, device: str, n: int, seconds: float) -> list[str]:
    """Ids ``consume`` hands out (loop bodies finished) until ``n`` came or ``seconds``."""
    got: list[str] = []
    if n == 0:
        return got
    async with store.consume(device) as commands:
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                async for command in commands:
                    got.append(command.id)
                    if len(got) >= n:
                        break
    return got


# -- 1. an outcome racing the outcome deadline's cleanup on another store ------------------


# Each scenario on one index in the test command (in turn), on every one under make reliability.
@pytest.mark.parametrize("backend", matrix(BACKENDS, ["sqlite"]))
async def test_outcome_racing_timeout_cleanup_never_overwritten(
    backend: str, tmp_path: Path
) -> None:
    rng = seeded()
    async with space_on(backend, tmp_path) as space:
        a = await space.open(relay_after=1.0)
        b = await space.open(relay_after=1.0)
        device = space.device()
        ids = [
            await a.enqueue(device, f"c{i}".encode(), 60, outcome_timeout=1.0) for i in range(20)
        ]
        got = await consume_n(a, device, len(ids), 10)
        assert got == ids
        start = asyncio.get_running_loop().time()
        answers: dict[str, str] = {}

        async def report(command_id: str, delay: float) -> None:
            await asyncio.sleep(delay)
            try:
                await a.complete_command(command_id, b"ok")
            except OutcomeRejected:
                answers[command_id] = "rejected"
            else:
                answers[command_id] = "ok"

        async def sweeping() -> None:
            while asyncio.get_running_loop().time() - start < 1.8:
                await b.cleanup()

        await asyncio.gather(sweeping(), *(report(i, rng.uniform(0.6, 1.5)) for i in ids))
        await b.cleanup()
        for command_id in ids:
            status = await b.get_status(command_id)
            outcome = await a.get_outcome(command_id)
            assert outcome is not None
            if answers[command_id] == "ok":
                assert status is CommandStatus.SUCCEEDED, (command_id, status)
                assert outcome.result == b"ok"
            else:
                assert status is CommandStatus.TIMED_OUT, (command_id, status)
            # A repeat: harmless when it is the recorded one, refused otherwise.
            if status is CommandStatus.SUCCEEDED:
                await b.complete_command(command_id, b"ok")
            else:
                with pytest.raises(OutcomeRejected):
                    await b.complete_command(command_id, b"ok")
            with pytest.raises(OutcomeRejected):
                await b.fail_command(command_id, "late")
            assert await a.get_status(command_id) is status


# -- 2. a report in the loop body, then the body raises; a second store's stream next ------


@pytest.mark.parametrize("backend", matrix(BACKENDS, ["postgres"]))
async def test_reported_in_body_then_raise_is_not_handed_out_again_elsewhere(
    backend: str, tmp_path: Path
) -> None:
    async with space_on(backend, tmp_path) as space:
        a = await space.open(relay_after=1.0)
        b = await space.open(relay_after=1.0)
        device = space.device()
        ids = [await a.enqueue(device, f"c{i}".encode(), 60) for i in range(5)]

        class Boom(Exception):
            pass

        async def failing_body() -> None:
            async with a.consume(device) as commands:
                async for command in commands:
                    assert command.id == ids[0]
                    await command.fail("motor stalled")
                    raise Boom

        with pytest.raises(Boom):
            await failing_body()
        assert await b.get_status(ids[0]) is CommandStatus.FAILED
        got = await consume_n(b, device, 4, 10)
        assert got == ids[1:], got
        # Still FAILED: a repeat was dropped, never marked or reopened.
        assert await a.get_status(ids[0]) is CommandStatus.FAILED
        for command_id in ids[1:]:
            assert await a.get_status(command_id) is CommandStatus.DELIVERED


# -- 3. a report in the loop body, then the store closes before the mark; a restart ------


@pytest.mark.parametrize("backend", matrix(BACKENDS, ["redis"]))
async def test_reported_then_break_and_restart_keeps_outcome_and_order(
    backend: str, tmp_path: Path
) -> None:
    async with space_on(backend, tmp_path) as space:
        a = await space.open(relay_after=1.0)
        device = space.device()
        ids = [await a.enqueue(device, f"c{i}".encode(), 60, outcome_timeout=30) for i in range(6)]
        async with a.consume(device) as commands:
            async for command in commands:
                await command.complete(b"r")
                if command.id == ids[2]:
                    break  # its body never "finished": the stream does not mark it
        await a.close()
        c = await space.open(relay_after=1.0)
        for command_id in ids[:3]:
            assert await c.get_status(command_id) is CommandStatus.SUCCEEDED
        got = await consume_n(c, device, 3, 10)
        assert got == ids[3:], got
        await c.cleanup()
        for command_id in ids[:3]:
            assert await c.get_status(command_id) is CommandStatus.SUCCEEDED
            outcome = await c.get_outcome(command_id)
            assert outcome is not None
            assert outcome.result == b"r"


# -- 4. rollouts racing consumers, a retirement, a rollout cancel and per-device cancels --


@pytest.mark.parametrize("backend", matrix(BACKENDS, ["sqlite"]))
async def test_rollouts_with_retire_cancel_and_consumers_count_truthfully(
    backend: str, tmp_path: Path
) -> None:
    rng = seeded()
    async with space_on(backend, tmp_path) as space:
        a = await space.open(relay_after=1.0)
        b = await space.open(relay_after=1.0)
        c = await space.open(relay_after=1.0)
        devices = [space.device() for _ in range(6)]
        rollouts = [
            await a.enqueue_many(devices, f"fw{r}".encode(), 60, command_type=f"t{r}")
            for r in range(4)
        ]
        streamed = devices[:3]
        retired = devices[3]
        received: dict[str, list[str]] = {d: [] for d in devices}

        async def stream(store: RabbitMQStore, device: str) -> None:
            with suppress(TimeoutError):
                async with asyncio.timeout(4):
                    async with store.consume(device) as commands:
                        async for command in commands:
                            received[device].append(command.id)
                            if rng.random() < 0.5:
                                await command.complete()
                            await asyncio.sleep(rng.uniform(0, 0.05))

        counts: list[int] = []

        async def operator() -> None:
            await asyncio.sleep(rng.uniform(0, 0.1))
            cancelled = await b.cancel_rollout(rollouts[2].rollout_id)
            await asyncio.sleep(rng.uniform(0, 0.1))
            retired_n = await c.retire_device(retired)
            counts.extend([cancelled, retired_n])

        await asyncio.gather(
            *(stream(b if i % 2 else c, d) for i, d in enumerate(streamed)), operator()
        )
        assert len(counts) == 2
        # After the retirement, a new command to the retired device is still delivered.
        after = await b.enqueue(retired, b"after", 60)
        assert await consume_n(a, retired, 1, 10) == [after]

        for device in devices:
            assert len(received[device]) == len(set(received[device])), received[device]
        for rollout in rollouts:
            summary = await c.rollout_summary(rollout.rollout_id)
            statuses = [await a.get_status(i) for i in rollout.command_ids]
            assert summary.total == len(rollout.command_ids)
            assert dict(Counter(statuses)) == {s: n for s, n in summary.counts.items() if n}, (
                summary,
                statuses,
            )
            for device, command_id, status in zip(
                devices, rollout.command_ids, statuses, strict=True
            ):
                if command_id in received[device]:
                    assert status in RECEIVED_STATUSES, (device, status)
                else:
                    # Never handed out: never reads as received.
                    assert status not in RECEIVED_STATUSES, (device, command_id, status)
                if device == retired:
                    assert status is CommandStatus.CANCELLED, status


# -- 5. max_pending_per_device under concurrent enqueues from several stores -------------


@pytest.mark.parametrize("backend", matrix(BACKENDS, ["postgres"]))
async def test_limit_holds_across_stores_and_replacements_pass_at_the_limit(
    backend: str, tmp_path: Path
) -> None:
    limits = Limits(max_pending_per_device=5)
    async with space_on(backend, tmp_path) as space:
        stores = [await space.open(relay_after=1.0, limits=limits) for _ in range(3)]
        device = space.device()
        other = space.device()

        async def one(i: int) -> str | None:
            store = stores[i % 3]
            try:
                kind = i % 3
                if kind == 0:
                    return await store.enqueue(device, f"p{i}".encode(), 60)
                if kind == 1:
                    return await store.enqueue_or_update(device, f"t{i}", f"u{i}".encode(), 60)
                rollout = await store.enqueue_many([other, device], f"m{i}".encode(), 60)
                return rollout.command_ids[1]
            except QueueFull:
                return None

        for _round in range(2):
            accepted = [x for x in await asyncio.gather(*(one(i) for i in range(24))) if x]
            assert len(accepted) == 5, len(accepted)
            pending = await stores[0].get_pending(device)
            assert sorted(p.id for p in pending) == sorted(accepted)
            # Replacements at the limit are not additions: all pass, concurrently.
            kept = [p for p in pending if p.command_type is not None]
            if kept:
                kind = kept[0].command_type
                assert kind is not None
                replaced = await asyncio.gather(
                    *(
                        stores[j % 3].enqueue_or_update(device, kind, f"r{j}".encode(), 60)
                        for j in range(9)
                    )
                )
                assert len(set(replaced)) == 9
                assert len(await stores[1].get_pending(device)) == 5
            drained = await stores[2].drain_pending(device)
            assert len(drained) == 5
            assert await stores[0].get_pending(device) == []


# -- 6. retire_device racing enqueues and a stream on the same device from other stores --


@pytest.mark.parametrize("backend", matrix(BACKENDS, ["redis"]))
async def test_retire_racing_enqueue_and_consume_loses_nothing_later(
    backend: str, tmp_path: Path
) -> None:
    rng = seeded()
    async with space_on(backend, tmp_path) as space:
        a = await space.open(relay_after=1.0)
        b = await space.open(relay_after=1.0)
        c = await space.open(relay_after=1.0)
        device = space.device()
        ids: list[str] = []
        handed: list[str] = []
        stop = asyncio.Event()

        async def producing() -> None:
            i = 0
            while not stop.is_set():
                ids.append(await b.enqueue(device, f"x{i}".encode(), 60))
                i += 1
                await asyncio.sleep(rng.uniform(0, 0.02))

        async def retiring() -> None:
            for _ in range(4):
                await asyncio.sleep(rng.uniform(0.1, 0.4))
                await a.retire_device(device)
            stop.set()

        async def streaming() -> None:
            while not stop.is_set():
                with suppress(Exception):
                    async with asyncio.timeout(0.5):
                        async with c.consume(device) as commands:
                            async for command in commands:
                                handed.append(command.id)

        await asyncio.gather(producing(), retiring(), streaming())
        final = [await b.enqueue(device, f"final{i}".encode(), 60) for i in range(3)]
        # Everything not cancelled must still reach the device.
        deadline = asyncio.get_running_loop().time() + 12
        while True:
            handed.extend(r.id for r in await c.drain_commands(device))
            open_ids = [
                i for i in [*ids, *final] if await a.get_status(i) in (CommandStatus.PENDING,)
            ]
            if not open_ids or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.3)
        assert open_ids == [], f"{len(open_ids)} commands stuck PENDING: {open_ids[:3]}"
        for command_id in final:
            assert await a.get_status(command_id) is CommandStatus.DELIVERED
        # Once each is promised within one stream; these streams are cut off by a timeout
        # with a command in hand, which the next one is handed again (at-least-once).
        assert set(final) <= set(handed)


# -- 7. a rollout's confirmation racing a retirement, a member's cancel and streams -------


@pytest.mark.parametrize("backend", matrix(BACKENDS, ["sqlite"]))
async def test_confirm_rollout_racing_retire_and_member_cancel(
    backend: str, tmp_path: Path
) -> None:
    rng = seeded()
    async with space_on(backend, tmp_path) as space:
        a = await space.open(relay_after=1.0)
        b = await space.open(relay_after=1.0)
        c = await space.open(relay_after=1.0)
        devices = [space.device() for _ in range(8)]
        rollout = await a.enqueue_many(
            devices, b"fw", 60, command_type="fw", requires_confirmation=True, by="alice"
        )
        member = dict(zip(devices, rollout.command_ids, strict=True))
        received: dict[str, list[str]] = {d: [] for d in devices}
        streamed = devices[2:5]

        async def stream(store: RabbitMQStore, device: str) -> None:
            with suppress(TimeoutError):
                async with asyncio.timeout(3):
                    async with store.consume(device) as commands:
                        async for command in commands:
                            received[device].append(command.id)
                            await command.complete(b"done")

        async def later(seconds: float, call: object) -> object:
            await asyncio.sleep(seconds)
            assert asyncio.iscoroutine(call)
            try:
                return await call
            except Exception as exc:
                return exc

        outcome = await asyncio.gather(
            later(rng.uniform(0, 0.05), a.confirm_rollout(rollout.rollout_id, by="bob")),
            later(rng.uniform(0, 0.05), b.retire_device(devices[0])),
            later(rng.uniform(0, 0.05), c.cancel_command(member[devices[1]])),
            *(stream(b if i % 2 else c, d) for i, d in enumerate(streamed)),
        )
        confirmed_n = outcome[0]
        assert isinstance(confirmed_n, int), confirmed_n
        records = [await b.get_command(i) for i in rollout.command_ids]
        assert confirmed_n == sum(1 for r in records if r.confirmed), (confirmed_n, records)
        statuses = {d: await c.get_status(member[d]) for d in devices}
        summary = await a.rollout_summary(rollout.rollout_id)
        assert dict(Counter(statuses.values())) == {s: n for s, n in summary.counts.items() if n}
        assert statuses[devices[0]] is CommandStatus.CANCELLED
        for device in streamed:
            assert received[device] == [member[device]], (device, received[device])
            assert statuses[device] is CommandStatus.SUCCEEDED
        for device in devices[5:]:
            assert statuses[device] is CommandStatus.PENDING
            assert await a.drain_pending(device) == [b"fw"]
        if isinstance(outcome[2], Exception):
            assert statuses[devices[1]] is CommandStatus.PENDING
        else:
            assert statuses[devices[1]] is CommandStatus.CANCELLED
            assert await a.drain_pending(devices[1]) == []


# -- 8. retire_device racing fan-outs from two other stores that declared the queue -----


@pytest.mark.parametrize("backend", matrix(BACKENDS, ["postgres"]))
async def test_retire_racing_fan_outs_from_other_stores(backend: str, tmp_path: Path) -> None:
    rng = seeded()
    async with space_on(backend, tmp_path) as space:
        a = await space.open(relay_after=1.0)
        b = await space.open(relay_after=1.0)
        c = await space.open(relay_after=1.0)
        target = space.device()
        others = [space.device() for _ in range(3)]
        written: list[tuple[int, str]] = []  # (round, id of the target's member)

        async def fanning(store: RabbitMQStore, tag: int) -> None:
            for r in range(12):
                rollout = await store.enqueue_many([*others, target], f"{tag}-{r}".encode(), 60)
                written.append((tag, rollout.command_ids[-1]))
                await asyncio.sleep(rng.uniform(0, 0.03))

        async def retiring() -> None:
            for _ in range(4):
                await asyncio.sleep(rng.uniform(0.02, 0.15))
                await a.retire_device(target)

        await asyncio.gather(fanning(b, 1), fanning(c, 2), retiring())
        live = [i for _, i in written if await a.get_status(i) is CommandStatus.PENDING]
        got: list[str] = []
        deadline = asyncio.get_running_loop().time() + 12
        while asyncio.get_running_loop().time() < deadline:
            got.extend(r.id for r in await a.drain_commands(target))
            if set(live) <= set(got):
                break
            await asyncio.sleep(0.3)
        missing = [i for i in live if i not in got]
        assert missing == [], (
            f"{len(missing)} of {len(live)} pending commands never delivered: "
            f"{[await a.get_status(i) for i in missing]}"
        )
        assert len(got) == len(set(got))
        for command_id in got:
            assert await b.get_status(command_id) is CommandStatus.DELIVERED


# -- 9. a command in a loop body's hands while another store retires the device ---------


@pytest.mark.parametrize("backend", matrix(BACKENDS, ["redis"]))
@pytest.mark.parametrize("report", [False, True])
async def test_retired_while_in_hand_reads_delivered(
    backend: str, report: bool, tmp_path: Path
) -> None:
    async with space_on(backend, tmp_path) as space:
        a = await space.open(relay_after=1.0)
        b = await space.open(relay_after=1.0)
        device = space.device()
        ids = [await a.enqueue(device, f"c{i}".encode(), 60) for i in range(3)]
        handed: list[str] = []
        retired = -1
        with suppress(TimeoutError):
            async with asyncio.timeout(6):
                async with a.consume(device) as commands:
                    async for command in commands:
                        handed.append(command.id)
                        if retired < 0:
                            retired = await b.retire_device(device)
                        if report:
                            await command.complete()
        assert handed == ids[:1], handed
        assert retired == 3  # in hand counts too (README rule 5)
        first = await b.get_status(ids[0])
        expected = CommandStatus.SUCCEEDED if report else CommandStatus.DELIVERED
        assert first is expected, first
        for command_id in ids[1:]:
            assert await b.get_status(command_id) is CommandStatus.CANCELLED
