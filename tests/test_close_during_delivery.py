"""Closing the store (or cancelling a call) while commands are being delivered.

``close()`` ends the store's consume loops and drains promptly, whoever owns the broker
connection. What a drain claimed but did not return to its caller (closed or cancelled
mid-way) goes back: never DELIVERED, still queued for a later drain, by this process or the
next one on the same state.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from amqp_queue import CommandStatus, Limits, QueueError, RabbitMQStore
from amqp_queue import drain as drain_module
from amqp_queue.inbox import Inbox
from amqp_queue.state import CommandRecord, SqlStore, Store
from tests.rabbitmq_support import queue_depth, rabbitmq_store
from tests.shared_index import drain_until, shared_index

DEVICE = "dev-1"


@asynccontextmanager
async def _store(tmp_path: Path, owner: str) -> AsyncIterator[RabbitMQStore]:
    """A RabbitMQStore that owns its connection (``connect``), or runs on the caller's."""
    if owner == "store":
        async with rabbitmq_store(tmp_path) as store:
            yield store
        return
    async with (
        shared_index("sqlite", tmp_path) as shared,
        shared.store(await shared.open_index()) as store,
    ):
        yield store


@pytest.mark.parametrize("owner", ["store", "caller"], ids=["own-connection", "callers-connection"])
async def test_close_ends_a_running_consume_loop(tmp_path: Path, owner: str) -> None:
    async with _store(tmp_path, owner) as store:
        received: list[str] = []
        first = asyncio.Event()

        async def device() -> None:
            async with store.consume(DEVICE) as stream:
                async for command in stream:
                    received.append(command.id)
                    first.set()

        command_id = await store.enqueue(DEVICE, b"cmd", 600)
        consumer = asyncio.create_task(device())
        try:
            await asyncio.wait_for(first.wait(), 5)
            await asyncio.wait_for(store.close(), 5)
            done, _ = await asyncio.wait([consumer], timeout=3)

            assert consumer in done, "the consume loop still runs 3 s after close()"
            error = consumer.exception()
            assert error is None or isinstance(error, QueueError), repr(error)
            assert received == [command_id]
        finally:
            await _stop(consumer)


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancels a task the test started; again while it does not end (today a stream's
    clean-up can wait for a closed connection to come back)."""
    for _ in range(5):
        if task.done():
            break
        task.cancel()
        await asyncio.wait([task], timeout=1)
    assert task.done(), "the consumer task could not be stopped"


class SlowClaims(SqlStore):
    """An index whose claims take ``delay`` seconds (a busy database), and tell when each
    one has returned; from the ``block_from``-th claim on they wait until released."""

    delay = 0.0
    block_from: int | None = None
    block_after_commit = False
    claims = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.claimed = asyncio.Event()
        self.blocked = asyncio.Event()
        self.unblocked = asyncio.Event()

    async def claim(
        self, device_id: str, command_ids: Collection[str] | None = None
    ) -> list[CommandRecord]:
        self.claims += 1
        blocking = self.block_from is not None and self.claims >= self.block_from
        if blocking and not self.block_after_commit:
            self.blocked.set()
            await self.unblocked.wait()
        await asyncio.sleep(self.delay)
        records = await super().claim(device_id, command_ids)
        if blocking and self.block_after_commit:
            # Committed; the answer is what is late (a slow network back from the database).
            self.blocked.set()
            await self.unblocked.wait()
        self.claimed.set()
        return records


async def _enqueue_many(store: RabbitMQStore, payloads: list[bytes]) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(payloads), 500):
        chunk = payloads[start : start + 500]
        ids += await asyncio.gather(*(store.enqueue(DEVICE, p, 3600) for p in chunk))
    return ids


async def _not_returned_but_delivered(
    state: Store, ids: list[str], payloads: list[bytes], returned: list[bytes]
) -> int:
    """How many commands a drain did not return are DELIVERED (asked of the index: the
    store may be closed)."""
    kept = set(returned)
    statuses = [
        await state.get_status(command_id)
        for command_id, payload in zip(ids, payloads, strict=True)
        if payload not in kept
    ]
    return statuses.count(CommandStatus.DELIVERED)


def _outcome(drain: asyncio.Task[list[bytes]]) -> list[bytes]:
    """What a finished drain returned: nothing if it raised a QueueError."""
    if drain.cancelled():
        return []
    error = drain.exception()
    if error is None:
        return drain.result()
    assert isinstance(error, QueueError), repr(error)
    return []


async def test_close_ends_a_drain_of_a_large_backlog_and_hands_back_the_rest(
    tmp_path: Path,
) -> None:
    count = 3000
    payloads = [f"c{n:04}".encode() for n in range(count)]
    async with shared_index("sqlite", tmp_path, prefetch=250) as shared:
        # A backlog over the default limit of open commands per device.
        state = await shared.open_index(SlowClaims, limits=Limits(max_pending_per_device=count))
        assert isinstance(state, SlowClaims)
        context: AbstractAsyncContextManager[RabbitMQStore] = shared.store(state)
        store = await context.__aenter__()
        drain: asyncio.Task[list[bytes]] | None = None
        try:
            ids = await _enqueue_many(store, payloads)
            state.delay = 0.5  # twelve windows: six seconds of drain at least
            drain = asyncio.create_task(store.drain_pending(DEVICE))
            await asyncio.wait_for(state.claimed.wait(), 5)

            loop = asyncio.get_running_loop()
            closing = loop.time()
            await asyncio.wait_for(store.close(), 5)
            done, _ = await asyncio.wait([drain], timeout=max(0.0, closing + 2.5 - loop.time()))
            assert drain in done, "the drain still ran 2.5 s after close() was called"
            first = _outcome(drain)
            assert await _not_returned_but_delivered(state, ids, payloads, first) == 0
        finally:
            if drain is not None:
                drain.cancel()
                await asyncio.wait([drain])
            await context.__aexit__(None, None, None)

        state.delay = 0.0
        async with shared.store(state) as later:  # the next process on the same state
            rest = await drain_until(later, DEVICE, count=count - len(first), seconds=5)
            assert first + rest == payloads
            assert await queue_depth(later, DEVICE) == 0


async def test_a_cancelled_drain_leaves_what_it_claimed_undelivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deep queue is claimed in several statements (five at a time here): the drain is
    cancelled with one claim committed and the next under way."""
    monkeypatch.setattr(drain_module, "CLAIM_MOST", 5)
    count = 20
    payloads = [f"c{n:02}".encode() for n in range(count)]
    async with shared_index("sqlite", tmp_path, prefetch=5) as shared:
        state = await shared.open_index(SlowClaims)
        assert isinstance(state, SlowClaims)
        async with shared.store(state) as store:
            ids = [await store.enqueue(DEVICE, payload, 600) for payload in payloads]
            state.block_from = 2  # the first five are claimed, the drain waits on the next claim
            drain = asyncio.create_task(store.drain_pending(DEVICE))
            await asyncio.wait_for(state.blocked.wait(), 5)
            drain.cancel()
            # The cancelled drain waits for the claim it started (it may commit) and gives
            # back what that took too.
            state.block_from = None
            state.unblocked.set()
            await asyncio.wait([drain], timeout=5)
            assert drain.cancelled()

            delivered = await _not_returned_but_delivered(state, ids, payloads, [])
            assert delivered == 0, (
                f"{delivered} commands the cancelled drain claimed are DELIVERED; nobody got them"
            )
            rest = await drain_until(store, DEVICE, count=count, seconds=3)
            assert rest == payloads
            assert await queue_depth(store, DEVICE) == 0


async def test_a_cancelled_drain_leaves_the_queue_in_order_for_a_consumer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a cancelled drain gives back keeps its place: a device consuming next gets every
    command in the order it was queued (a drain re-sorts what it returns; a stream cannot)."""
    monkeypatch.setattr(drain_module, "CLAIM_MOST", 5)  # claimed five at a time
    count = 20
    payloads = [f"c{n:02}".encode() for n in range(count)]
    async with shared_index("sqlite", tmp_path, prefetch=5) as shared:
        state = await shared.open_index(SlowClaims)
        assert isinstance(state, SlowClaims)
        async with shared.store(state) as store:
            for payload in payloads:
                await store.enqueue(DEVICE, payload, 600)
            state.block_from = 3  # two claims settled, the drain waits on the third
            drain = asyncio.create_task(store.drain_pending(DEVICE))
            await asyncio.wait_for(state.blocked.wait(), 5)

            # A device already waiting on the queue when the drain is cancelled (the drain
            # holds every message: it reads without a prefetch bound).
            received: list[bytes] = []
            listening = asyncio.Event()

            async def device() -> None:
                async with store.consume(DEVICE) as stream:
                    listening.set()
                    async for command in stream:
                        received.append(command.payload)
                        if len(received) == count:
                            return

            consumer = asyncio.create_task(device())
            await asyncio.wait_for(listening.wait(), 5)
            drain.cancel()
            state.block_from = None
            state.unblocked.set()
            await asyncio.wait([drain], timeout=5)
            assert drain.cancelled()
            await asyncio.wait_for(consumer, 10)
            assert received == payloads
            assert await queue_depth(store, DEVICE) == 0


class SlowWindows(SqlStore):
    """An index whose window queries (``deliverable``) wait, once ``gate`` is armed, until
    it is set: a database slower than the store's close grace."""

    gate: asyncio.Event | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked = asyncio.Event()

    async def deliverable(self, command_ids: Collection[str]) -> dict[str, CommandRecord]:
        if self.gate is not None:
            self.asked.set()
            await self.gate.wait()
        return await super().deliverable(command_ids)


async def test_close_while_a_window_query_outlasts_the_grace_hands_nothing_out(
    tmp_path: Path,
) -> None:
    """close() requeues what a stream holds after CLOSE_GRACE; a window query still running
    then must not hand its commands out when it returns (they are queued again, and would
    reach the device twice)."""
    async with shared_index("sqlite", tmp_path) as shared:
        state = await shared.open_index(SlowWindows)
        assert isinstance(state, SlowWindows)
        context: AbstractAsyncContextManager[RabbitMQStore] = shared.store(state)
        store = await context.__aenter__()
        handed: list[bytes] = []
        try:
            await store.enqueue(DEVICE, b"once", 600)
            state.gate = asyncio.Event()

            async def device() -> None:
                async with store.consume(DEVICE) as stream:
                    async for command in stream:
                        handed.append(command.payload)

            consumer = asyncio.create_task(device())
            await asyncio.wait_for(state.asked.wait(), 5)
            await asyncio.wait_for(store.close(), 10)  # gives up on the stream after the grace
            state.gate.set()
            state.gate = None
            await asyncio.wait([consumer], timeout=5)
            assert consumer.done()
            error = consumer.exception()
            assert error is None or isinstance(error, QueueError), repr(error)
        finally:
            await context.__aexit__(None, None, None)
        assert handed == [], "a command requeued by close() was handed out as well"

        async with shared.store(state) as later:  # the next process: it gets it, once
            assert await drain_until(later, DEVICE, count=1, seconds=5) == [b"once"]
            assert await queue_depth(later, DEVICE) == 0


@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_drain_cancelled_after_its_claim_committed_gives_that_claim_back(
    tmp_path: Path, cancels: int
) -> None:
    """The claim's transaction committed, its answer had not come back when the drain was
    cancelled: those commands are the drain's to give back, not DELIVERED to nobody. Also
    when a second cancel (a timeout and a task group both cancelling, say) comes while the
    drain waits for the claim to finish."""
    count = 10
    payloads = [f"c{n:02}".encode() for n in range(count)]
    async with shared_index("sqlite", tmp_path, prefetch=5) as shared:
        state = await shared.open_index(SlowClaims)
        assert isinstance(state, SlowClaims)
        async with shared.store(state) as store:
            ids = [await store.enqueue(DEVICE, payload, 600) for payload in payloads]
            state.block_from = 1
            state.block_after_commit = True
            drain = asyncio.create_task(store.drain_pending(DEVICE))
            await asyncio.wait_for(state.blocked.wait(), 5)
            for _ in range(cancels):
                drain.cancel()
                await asyncio.sleep(0.01)
            state.block_from = None
            state.unblocked.set()
            await asyncio.wait([drain], timeout=5)
            assert drain.cancelled()

            delivered = await _not_returned_but_delivered(state, ids, payloads, [])
            assert delivered == 0, f"{delivered} commands a cancelled drain claimed are lost"
            assert await drain_until(store, DEVICE, count=count, seconds=5) == payloads


class SlowReleases(SqlStore):
    """An index whose releases (a cancelled drain giving its claims back) wait until let go."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.releasing = asyncio.Event()
        self.let_go = asyncio.Event()

    async def release(
        self, requeued: Sequence[CommandRecord], republish: Sequence[CommandRecord]
    ) -> int:
        self.releasing.set()
        await self.let_go.wait()
        return await super().release(requeued, republish)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@pytest.mark.parametrize("channel", ["kept", "lost"])
async def test_a_drain_cancelled_while_asking_the_broker_has_claimed_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, channel: str, kind: str
) -> None:
    """A drain cancelled while it asks the broker how many messages are ready (a queue
    declare, its windows read) has claimed nothing yet: its messages go back to the queue
    and another process's drain gets every command, in order; also when the channel is lost
    meanwhile (aiormq closes one whose RPC is cancelled, and the broker requeues what it
    held). The drain used to claim each window as it came, and a channel lost before it had
    given those claims back left their commands delivered to nobody."""
    payloads = [b"one", b"two", b"three"]
    asking = asyncio.Event()
    inboxes: list[Inbox] = []
    ready_unless_deleted = Inbox.ready_unless_deleted

    async def announced(inbox: Inbox) -> int | None:
        inboxes.append(inbox)
        asking.set()
        return await ready_unless_deleted(inbox)

    monkeypatch.setattr(Inbox, "ready_unless_deleted", announced)
    async with shared_index(kind, tmp_path) as shared:
        state = await shared.open_index()
        async with (
            shared.store(state) as store,
            shared.store(await shared.open_index()) as other,
        ):
            ids = [await store.enqueue(DEVICE, payload, 600) for payload in payloads]
            drain = asyncio.create_task(store.drain_pending(DEVICE))
            await asyncio.wait_for(asking.wait(), 5)
            drain.cancel()
            if channel == "lost":
                await inboxes[0].channel.close()  # the broker requeues what it held
            await asyncio.wait([drain], timeout=5)
            assert drain.cancelled()
            assert await _not_returned_but_delivered(state, ids, payloads, []) == 0

            got = await drain_until(other, DEVICE, count=len(payloads), seconds=5)
            assert got == payloads, f"lost: {set(payloads) - set(got)}"


class SlowClaimsAndReleases(SlowClaims, SlowReleases):
    """Claims that can be held up after their commit, releases that wait until let go."""


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_cancelled_drain_whose_channel_is_lost_while_it_gives_back_republishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A drain cancelled once its claim committed gives the claim back; its channel is
    lost while the index takes it back, so the broker requeued the messages while their
    commands were still claimed. Another process's drain got them back redelivered: it ends
    the dead-looking claims and hands the commands out at once (it used to drop them as
    delivered, and the give-back had them published again). The give-back then leaves that
    delivery alone: nothing comes twice."""
    payloads = [b"one", b"two", b"three"]
    inboxes: list[Inbox] = []
    ready_unless_deleted = Inbox.ready_unless_deleted

    async def noted(inbox: Inbox) -> int | None:
        inboxes.append(inbox)
        return await ready_unless_deleted(inbox)

    monkeypatch.setattr(Inbox, "ready_unless_deleted", noted)
    async with shared_index(kind, tmp_path) as shared:
        state = await shared.open_index(SlowClaimsAndReleases)
        assert isinstance(state, SlowClaimsAndReleases)
        async with (
            shared.store(state) as store,
            shared.store(await shared.open_index()) as other,
        ):
            ids = [await store.enqueue(DEVICE, payload, 600) for payload in payloads]
            state.block_from = 1
            state.block_after_commit = True
            drain = asyncio.create_task(store.drain_pending(DEVICE))
            await asyncio.wait_for(state.blocked.wait(), 5)
            drain.cancel()
            state.unblocked.set()
            await asyncio.wait_for(state.releasing.wait(), 5)
            await inboxes[0].channel.close()  # the broker requeues what it held
            # Another process drains while the give-back waits for the index.
            assert await other.drain_pending(DEVICE) == payloads
            state.let_go.set()
            await asyncio.wait([drain], timeout=5)
            assert drain.cancelled()

            assert await drain_until(other, DEVICE, count=1, seconds=3) == []
            assert [await other.get_status(i) for i in ids] == [CommandStatus.DELIVERED] * 3


async def test_a_cancelled_drain_whose_consumer_cancel_never_answers_still_gives_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker never answers a cancelled drain's consumer cancel (a connection stuck
    until its heartbeat fails): the give-back waits ``publish_timeout``, not for ever, and
    hands the commands to the outbox, as if the channel were gone."""
    payloads = [b"one", b"two", b"three"]
    asking = asyncio.Event()
    ready_unless_deleted = Inbox.ready_unless_deleted
    stop = Inbox.stop

    async def announced(inbox: Inbox) -> int | None:
        asking.set()
        return await ready_unless_deleted(inbox)

    async def unanswered(inbox: Inbox) -> None:
        if asking.is_set():
            await asyncio.Event().wait()
        await stop(inbox)

    monkeypatch.setattr(Inbox, "ready_unless_deleted", announced)
    monkeypatch.setattr(Inbox, "stop", unanswered)
    async with (
        shared_index("sqlite", tmp_path, publish_timeout=1.0) as shared,
        shared.store(await shared.open_index()) as store,
        shared.store(await shared.open_index()) as other,
    ):
        for payload in payloads:
            await store.enqueue(DEVICE, payload, 600)
        drain = asyncio.create_task(store.drain_pending(DEVICE))
        await asyncio.wait_for(asking.wait(), 5)
        drain.cancel()
        await asyncio.wait([drain], timeout=5)
        assert drain.cancelled(), "the give-back waited for the broker for ever"
        monkeypatch.setattr(Inbox, "stop", stop)

        got = await drain_until(other, DEVICE, count=len(payloads), seconds=5)
        assert got == payloads, f"lost: {set(payloads) - set(got)}"


async def test_a_drain_cancelled_while_its_consumer_starts_leaves_the_connection_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the broker starts its consumer, a drain's channel used to be closed
    half way by aiormq and then again by the drain, which stopped its reader before the
    broker's Close-Ok; the deliveries still coming for it filled its frame buffer and the
    connection stopped reading for every channel: the store's next drains timed out opening
    theirs."""
    payloads = [f"c{n:02}".encode() for n in range(40)]
    starting = asyncio.Event()
    start = Inbox.start

    async def announced(inbox: Inbox) -> None:
        starting.set()
        await start(inbox)

    monkeypatch.setattr(Inbox, "start", announced)
    async with _store(tmp_path, "store") as store:
        for payload in payloads:
            await store.enqueue(DEVICE, payload, 600)
        drain = asyncio.create_task(store.drain_pending(DEVICE))
        await asyncio.wait_for(starting.wait(), 5)
        drain.cancel()
        await asyncio.wait([drain], timeout=5)
        assert drain.cancelled()
        monkeypatch.setattr(Inbox, "start", start)

        async def drained() -> list[bytes]:
            return await drain_until(store, DEVICE, count=len(payloads), seconds=5)

        got = await asyncio.wait_for(drained(), 8)
        assert got == payloads


async def test_closing_a_stream_from_another_task_ends_its_waiting_loop(tmp_path: Path) -> None:
    """A gateway's disconnect handler closes the stream its device loop waits on: the loop
    ends (it used to wait for the broker for ever)."""
    async with _store(tmp_path, "store") as store:
        stream = store.consume(DEVICE)
        waiting = asyncio.Event()

        async def device() -> list[str]:
            received: list[str] = []
            async with stream:
                waiting.set()
                async for command in stream:
                    received.append(command.id)
            return received

        loop_task = asyncio.create_task(device())
        await asyncio.wait_for(waiting.wait(), 5)
        await asyncio.wait_for(stream.close(), 5)
        assert await asyncio.wait_for(loop_task, 5) == []


async def _broker_call(store: RabbitMQStore, call: str) -> None:
    if call == "enqueue":
        await store.enqueue("dev-1", b"b", 60)
    elif call == "drain":
        await store.drain_pending("dev-1")
    else:
        async with store.consume("dev-1") as stream:
            await anext(stream)


@pytest.mark.parametrize("call", ["enqueue", "drain", "consume"])
async def test_a_closed_store_refuses_broker_calls_at_once(tmp_path: Path, call: str) -> None:
    # They waited publish_timeout (10 s) for a channel of the closed connection, then failed.
    async with _store(tmp_path, "store") as store:
        await store.enqueue("dev-1", b"a", 60)
    started = asyncio.get_running_loop().time()

    with pytest.raises(QueueError, match="closed"):
        await _broker_call(store, call)

    assert asyncio.get_running_loop().time() - started < 2
    async with await SqlStore.connect(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}") as index:
        assert [command.payload for command in await index.get_pending("dev-1")] == [b"a"]
