"""Adversarial wire faults (fifth round): the public API of RabbitMQStore while its
connections are cut or stalled at the worst moments.

Each store under attack reaches the broker and its state index (PostgreSQL or Redis; SQLite
has no wire) through its own loopback proxy (:class:`StallProxy`, a :class:`TCPProxy` that can
also *stall*: hold every byte in both directions, as a dead link does before TCP gives up),
or has its broker connection closed server side (``rabbitmqctl close_connection``). Faults
come during ``consume`` hand-outs, ``drain_pending``, ``enqueue_many`` fan-outs,
``confirm_command`` / ``confirm_rollout``, ``cancel_command``, ``retire_device`` and
``close()``; two at once (index stalled and broker closed), with the caller's own
cancellation (``asyncio.timeout``) on top, and with several stores on one index of which
only one is cut off.

After recovery every scenario checks, with the public API and a raw look at the device queue:
each accepted command handed out once (``consume`` may repeat one under the same id where
the docs say so), in enqueue order per device, nothing stale, statuses true, nothing left
unpublished; and every call that failed raised a ``QueueError`` (not a bare asyncio,
aio-pika, asyncpg or redis exception, and not a hang).

What this round found is fixed or listed as not fixed in docs/reliability.md: retire_device
cut off from its index (tests/test_retire_index_refusal.py); close() and calls that wait on a
stalled PostgreSQL link without bound (not fixed).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
from sqlalchemy.engine import make_url

from amqp_queue import (
    CommandStatus,
    QueueError,
    RabbitMQConfig,
    RabbitMQStore,
)
from tests.backends import POSTGRES_URL, postgres_schema, redis_prefix
from tests.faults.broker import close_connections_named
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import unique
from tests.tcp_proxy import LOOPBACK, StallProxy

pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

STORM_SECONDS = float(os.environ.get("AMQP_QUEUE_STORM_SECONDS", "3"))
"""How long the storms last (the test command's short form; 8 s or more for a longer trial)."""
LONG = 600.0
WIRED = ["postgres", "redis"]


# -- the environment: one index, one exchange, stores direct or behind proxies ------------


@dataclass
class Wire:
    """One state index and one exchange; stores open on them directly or through the
    proxies (``index`` in front of the index server, ``broker`` in front of RabbitMQ)."""

    backend: str
    direct_url: str
    proxied_url: str
    index: StallProxy
    broker: StallProxy
    exchange: str
    name: str = field(default_factory=lambda: unique("wire"))
    devices: set[str] = field(default_factory=set)
    stores: list[RabbitMQStore] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def device(self) -> str:
        device = unique("d")
        self.devices.add(device)
        return device

    async def open(self, *, cut_off: bool = True, **config: Any) -> RabbitMQStore:
        """A store on the shared index and exchange: behind both proxies (``cut_off``, and
        with connections named for ``close_broker``) or direct."""
        config.setdefault("relay_after", 1.0)
        config.setdefault("relay_interval", 1.0)
        config.setdefault("publish_timeout", 3.0)
        if cut_off:
            amqp = f"{self.broker.amqp_url}?name={self.name}&reconnect_interval=0.2"
            state = self.proxied_url
        else:
            amqp, state = AMQP_URL, self.direct_url
        store = await asyncio.wait_for(
            RabbitMQStore.connect(
                amqp, state_url=state, config=RabbitMQConfig(exchange=self.exchange, **config)
            ),
            15,
        )
        self.stores.append(store)
        return store

    async def close_broker(self) -> int:
        """Closes, server side, every broker connection of the cut-off stores."""
        return await asyncio.to_thread(close_connections_named, self.name)

    def failed(self, exc: BaseException) -> None:
        """Notes a failed call; the scenario asserts each is a library error."""
        self.errors.append(exc)

    def assert_clear_errors(self) -> None:
        unclear = [e for e in self.errors if not isinstance(e, QueueError)]
        assert not unclear, f"calls failed with errors outside the library's: {unclear!r}"


@asynccontextmanager
async def _urls(backend: str, port: int) -> AsyncIterator[tuple[str, str]]:
    if backend == "postgres":
        async with postgres_schema() as schema:
            url = make_url(POSTGRES_URL).update_query_dict({"schema": schema})
            yield (
                url.render_as_string(hide_password=False),
                url.set(host=LOOPBACK, port=port).render_as_string(hide_password=False),
            )
    else:
        async with redis_prefix() as prefix:
            yield (
                f"redis://{LOOPBACK}:6379/0?prefix={prefix}",
                f"redis://{LOOPBACK}:{port}/0?prefix={prefix}",
            )


@asynccontextmanager
async def wire_on(backend: str) -> AsyncIterator[Wire]:
    target = 5432 if backend == "postgres" else 6379
    async with (
        StallProxy(target, max_connections=200) as index,
        StallProxy(5672, max_connections=64) as broker,
        _urls(backend, index.port) as (direct, proxied),
    ):
        wire = Wire(backend, direct, proxied, index, broker, unique("wire."))
        try:
            yield wire
        finally:
            index.resume()
            broker.resume()
            await index.restore()
            await broker.restore()
            for store in wire.stores:
                with suppress(Exception):
                    await asyncio.wait_for(store.close(), 15)
            await delete_namespace(wire.exchange, sorted(wire.devices))
            gc.collect()


# -- checks ---------------------------------------------------------------------------------


def numbered(i: int) -> bytes:
    return f"n:{i:05d}".encode()


def number(payload: bytes) -> int:
    return int(payload.split(b":")[-1])


def assert_once(ids: list[str], what: str = "") -> None:
    twice = {i: n for i, n in Counter(ids).items() if n > 1}
    assert not twice, f"handed out more than once {what}: {twice}"


def assert_ascending(payloads: list[bytes], what: str = "") -> None:
    numbers = [number(p) for p in payloads]
    assert numbers == sorted(numbers), f"out of order {what}: {numbers}"


async def raw_depth(wire: Wire, device: str) -> int:
    """Ready messages in the device queue (a passive declare on a fresh connection), or -1
    when the queue does not exist."""
    queue = RabbitMQConfig(exchange=wire.exchange).queue_name(device)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return -1
        return declared.declaration_result.message_count or 0


async def raw_messages(wire: Wire, device: str) -> list[tuple[str | None, bool, bytes]]:
    """The messages in the device queue (id, redelivered, body), read and requeued."""
    queue = RabbitMQConfig(exchange=wire.exchange).queue_name(device)
    connection = await aio_pika.connect(AMQP_URL)
    out: list[tuple[str | None, bool, bytes]] = []
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        while (message := await declared.get(fail=False, no_ack=False)) is not None:
            out.append((message.message_id, bool(message.redelivered), message.body))
    return out


async def assert_only_stale_copies_left(wire: Wire, store: RabbitMQStore, device: str) -> None:
    """What is left in the device queue after a fault may only be copies of finished
    commands (docs: a copy is possible after a fault, dropped at delivery): a drain hands
    none of them out, and the queue is empty after it."""
    left = await raw_messages(wire, device)
    for message_id, _, _ in left:
        assert message_id is not None
        status = await store.get_status(message_id)
        assert status is not CommandStatus.PENDING, f"{message_id} left queued and pending"
    assert await store.drain_pending(device) == []
    assert await raw_depth(wire, device) == 0


async def drain_all(store: RabbitMQStore, device: str, seconds: float = 15) -> list[bytes]:
    """Drains until nothing is pending for the device and the queue stays empty."""
    got: list[bytes] = []
    empty = 0
    async with asyncio.timeout(seconds):
        while empty < 2 or await store.get_pending(device):
            batch = await store.drain_pending(device)
            got.extend(batch)
            empty = 0 if batch else empty + 1
            if not batch:
                await asyncio.sleep(0.15)
    return got


async def statuses(store: RabbitMQStore, ids: list[str]) -> list[CommandStatus]:
    return [await store.get_status(i) for i in ids]


async def produce(
    stop: asyncio.Event, store: RabbitMQStore, device: str, accepted: list[str], rng: Any
) -> None:
    """Enqueues numbered commands to ``device`` until ``stop``, noting each accepted id."""
    i = 0
    while not stop.is_set():
        accepted.append(await store.enqueue(device, numbered(i), LONG))
        i += 1
        await asyncio.sleep(rng.uniform(0, 0.02))


async def fault_storm(wire: Wire, stop: asyncio.Event, rng: Any) -> None:
    """Until ``stop``: the cut-off store's index link cut or stalled (replies only, at times)
    and its broker connections closed, one or two at once, at random moments."""
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.3, 0.8))
        what = rng.choice(["cut", "stall", "broker", "both"])
        if what in ("stall", "both"):
            wire.index.stall(replies_only=rng.random() < 0.5)
            await asyncio.sleep(rng.uniform(0.1, 0.6))
        if what in ("broker", "both"):
            await wire.close_broker()
        if what in ("cut", "both"):
            await wire.index.cut()
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            await wire.index.restore()
        wire.index.resume()


async def stream_until_handed(
    wire: Wire,
    store: RabbitMQStore,
    device: str,
    accepted: list[str],
    got: list[tuple[str, bytes]],
    producing: asyncio.Future[None],
) -> None:
    """One consume stream on ``store``, noting in ``got`` what it hands out, until the
    producer (``producing``) has ended and every command in ``accepted`` has been handed
    out.

    Not until the storm has stopped: the producer's last enqueue may still be in flight
    then, its id not in ``accepted`` yet, and a stream one command behind would catch up
    with the count and end without it. A wait for the next command ends when the producer
    does, so a stream that has everything stops then rather than wait for one more. The
    docs: a window the index failed on is kept and asked about again on the next
    iteration, so the same stream is asked again after a library error."""

    def all_handed() -> bool:
        return producing.done() and len({i for i, _ in got}) >= len(accepted)

    async with store.consume(device) as stream:
        iterator = stream.__aiter__()
        while not all_handed():
            asking = asyncio.ensure_future(iterator.__anext__())
            either: list[asyncio.Future[Any]] = [asking, producing]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not asking.done() and all_handed():
                asking.cancel()
                await asyncio.wait([asking])
                return
            try:
                command = await asking
            except StopAsyncIteration:
                return
            except QueueError as exc:
                wire.failed(exc)
                await asyncio.sleep(0.05)
                continue
            got.append((command.id, command.payload))


async def retried(wire: Wire, call: Any, attempts: int = 5) -> Any:
    """``call()`` again after a library error (a connection the cut left dead fails the
    first call on it), noting each failure; fails the test after ``attempts``."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except QueueError as exc:
            wire.failed(exc)
            print(f"retried after {exc!r}")
            await asyncio.sleep(0.2)
    return await call()


async def later(seconds: float, action: Any) -> None:
    await asyncio.sleep(seconds)
    result = action()
    if asyncio.iscoroutine(result):
        await result


# -- 1. consume: the index stalls after a hand-out, then the broker closes the connection --


@pytest.mark.parametrize("backend", WIRED)
async def test_consume_with_index_stalled_and_broker_closed_hands_out_each_once(
    backend: str,
) -> None:
    """A stream on a cut-off store; after the 10th hand-out (its body running) the index
    stalls and the broker closes the store's connections; the index comes back 1.5 s later.
    Every command comes once, in order; all end DELIVERED; the queue ends empty."""
    async with wire_on(backend) as wire:
        producer = await wire.open(cut_off=False)
        gateway = await wire.open()
        device = wire.device()
        total = 30
        ids = [await producer.enqueue(device, numbered(i), LONG) for i in range(total)]
        got: list[tuple[str, bytes]] = []

        async def run() -> None:
            async with gateway.consume(device) as stream:
                async for command in stream:
                    got.append((command.id, command.payload))
                    if len(got) == 10:
                        wire.index.stall()
                        await wire.close_broker()
                        asyncio.get_running_loop().call_later(1.5, wire.index.resume)
                    if len({i for i, _ in got}) >= total:
                        break

        await asyncio.wait_for(run(), 30)
        seen = [i for i, _ in got]
        assert set(seen) == set(ids)
        assert_once(seen)
        assert_ascending([p for _, p in got])

        async def settled() -> bool:
            return set(await statuses(producer, ids)) == {CommandStatus.DELIVERED}

        async with asyncio.timeout(10):
            while not await settled():  # noqa: ASYNC110 - polling the index
                await asyncio.sleep(0.2)
        await assert_only_stale_copies_left(wire, producer, device)


# -- 2. a drain cancelled while the index stalls and the broker closes ---------------------


@pytest.mark.parametrize("backend", WIRED)
async def test_drain_timed_out_with_index_stalled_and_broker_closed_loses_nothing(
    backend: str,
) -> None:
    """A cut-off store's drain is under way when its index stalls; the broker closes its
    connections and the caller's timeout fires; the index comes back 1 s later. Nothing the
    drain had in hand is lost: a direct store then drains every command once, in order."""
    async with wire_on(backend) as wire:
        producer = await wire.open(cut_off=False)
        gateway = await wire.open()
        device = wire.device()
        total = 40
        ids = [await producer.enqueue(device, numbered(i), LONG) for i in range(total)]
        first: list[bytes] = []
        wire.index.stall()
        drain = asyncio.create_task(gateway.drain_pending(device))
        await asyncio.sleep(0.6)
        await wire.close_broker()
        await asyncio.sleep(0.2)
        drain.cancel()
        asyncio.get_running_loop().call_later(1.0, wire.index.resume)
        try:
            first = await asyncio.wait_for(drain, 20)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            wire.failed(exc)
        rest = await drain_all(producer, device, 20)
        got = first + rest
        assert sorted(got) == sorted(numbered(i) for i in range(total)), (
            f"lost {sorted(set(numbered(i) for i in range(total)) - set(got))}, "
            f"repeated {[p for p, n in Counter(got).items() if n > 1]}"
        )
        assert_ascending(rest, "in the later drains")
        assert set(await statuses(producer, ids)) == {CommandStatus.DELIVERED}
        wire.assert_clear_errors()


# -- 3. a confirm whose write landed while its answer was lost, then a plain enqueue -------


async def _cut_during(wire: Wire, call: Any, *, hold: float = 0.4, down: float = 0.0) -> Any:
    """Runs ``call`` with the index's replies held (what it sends still reaches the server),
    then cuts the index connections ``hold`` seconds in; restores after ``down`` more
    seconds. Returns the call's result, or the exception it raised."""
    wire.index.stall(replies_only=True)
    task = asyncio.ensure_future(call)
    await asyncio.sleep(hold)
    await wire.index.cut()
    wire.index.resume()
    await asyncio.sleep(down)
    await wire.index.restore()
    try:
        return await asyncio.wait_for(task, 20)
    except Exception as exc:  # judged by the caller
        return exc


@pytest.mark.parametrize("backend", WIRED)
async def test_confirm_whose_answer_was_lost_is_not_overtaken_by_a_later_enqueue(
    backend: str,
) -> None:
    """A confirmation reaches the index, which commits it, but its answer is lost (the
    connection cut). Whether the call raises or not, the confirmed command became ready
    before the plain command enqueued right after the call returned, so a device reading
    its queue must get the confirmed one first; and each exactly once."""
    async with wire_on(backend) as wire:
        operator = await wire.open(relay_after=2.0)
        gateway = await wire.open(cut_off=False)
        device = wire.device()
        await operator.ensure_queue(device)
        waiting = await operator.enqueue_with_confirmation(device, "setpoint", b"n:00000", LONG)
        outcome = await _cut_during(wire, operator.confirm_command(waiting))
        if isinstance(outcome, BaseException):
            wire.failed(outcome)
        print(f"confirm: {outcome!r}")
        status = await gateway.get_status(waiting)
        after = await retried(wire, lambda: operator.enqueue(device, b"n:00001", LONG))
        got: list[tuple[str, bytes]] = []
        if status is CommandStatus.PENDING:
            expected = [waiting, after]
        else:
            assert status is CommandStatus.AWAITING_CONFIRMATION
            assert isinstance(outcome, QueueError), "confirm returned but did not confirm"
            expected = [after]

        async def run() -> None:
            async with gateway.consume(device) as stream:
                async for command in stream:
                    got.append((command.id, command.payload))
                    if len(got) >= len(expected):
                        break

        await asyncio.wait_for(run(), 15)
        assert [i for i, _ in got] == expected, (
            f"confirm answered {outcome!r}; status after: {status}; handed out {got}"
        )
        wire.assert_clear_errors()


@pytest.mark.parametrize("backend", WIRED)
async def test_cancel_whose_answer_was_lost_tells_the_truth(backend: str) -> None:
    """A cancel reaches the index, which commits it, but its answer is lost. If the call
    raises, its error must not say the command was not cancelled while it was; if it
    returns, the command is cancelled. Either way a drain hands out only what is live."""
    async with wire_on(backend) as wire:
        operator = await wire.open()
        gateway = await wire.open(cut_off=False)
        device = wire.device()
        ids = [await operator.enqueue(device, numbered(i), LONG) for i in range(3)]
        outcome = await _cut_during(wire, operator.cancel_command(ids[1]))
        print(f"cancel: {outcome!r}")
        status = await gateway.get_status(ids[1])
        if isinstance(outcome, BaseException):
            wire.failed(outcome)
            if status is CommandStatus.CANCELLED:
                # Nothing in the error may say "not cancelled".
                assert "not" not in str(outcome).lower() or "unknown" in str(outcome).lower(), (
                    f"the cancel landed but the caller was told: {outcome!r}"
                )
        else:
            assert status is CommandStatus.CANCELLED
        got = await drain_all(gateway, device)
        live = (
            [numbered(0), numbered(2)]
            if status is CommandStatus.CANCELLED
            else [numbered(i) for i in range(3)]
        )
        assert got == live
        wire.assert_clear_errors()


# -- close() while a stream and a drain run and the index stalls ----------------------------


# PostgreSQL only: on Redis a drain's claim whose reply the stall lost is a doubt in this
# process's memory, which close() cannot settle while the index does not answer; the
# commands it took then stay DELIVERED to nobody (docs/reliability.md, not fixed).
@pytest.mark.parametrize("backend", ["postgres"])
async def test_close_with_the_index_stalled_mid_stream_and_mid_drain_is_bounded_and_loses_nothing(
    backend: str,
) -> None:
    """A cut-off store runs a consume stream on one device (its body in progress) and a drain
    on another when its index stalls; close() is called. close() must end in bounded time
    (see RabbitMQStore.close) and raise nothing but a library error. The index then comes
    back; a direct store hands out every command not yet handed out exactly once, in order;
    a command in the stream's hands may come again (its body never finished).

    On PostgreSQL the cut-off store's statements have a 2 s bound (``?command_timeout=2``;
    30 s by default): without one, close() waited as long as the stall lasted."""
    async with wire_on(backend) as wire:
        if backend == "postgres":
            wire.proxied_url += "&command_timeout=2"
        producer = await wire.open(cut_off=False)
        gateway = await wire.open()
        streamed, drained = wire.device(), wire.device()
        total = 20
        for i in range(total):
            await producer.enqueue(streamed, numbered(i), LONG)
            await producer.enqueue(drained, numbered(i), LONG)
        got_stream: list[tuple[str, bytes]] = []
        in_body = asyncio.Event()
        release = asyncio.Event()

        async def stream() -> None:
            async with gateway.consume(streamed) as commands:
                async for command in commands:
                    got_stream.append((command.id, command.payload))
                    if len(got_stream) == 5:
                        in_body.set()
                        await release.wait()  # the device takes its time

        streaming = asyncio.create_task(stream())
        await asyncio.wait_for(in_body.wait(), 10)
        wire.index.stall()
        draining = asyncio.create_task(gateway.drain_pending(drained))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        closing = asyncio.ensure_future(gateway.close())
        await asyncio.wait([closing], timeout=15)
        took = time.monotonic() - started
        hung = not closing.done()
        wire.index.resume()
        release.set()
        try:
            await asyncio.wait_for(closing, 15)
        except QueueError as exc:
            wire.failed(exc)
        got_drain: list[bytes] = []
        for task in (streaming, draining):
            try:
                await asyncio.wait_for(task, 10)
            except (asyncio.CancelledError, StopAsyncIteration):
                pass
            except QueueError as exc:
                wire.failed(exc)
        if draining.done() and not draining.cancelled() and draining.exception() is None:
            got_drain = draining.result()
        print(f"close took {took:.1f} s; stream got {len(got_stream)}, drain got {got_drain}")
        rest_stream = await drain_all(producer, streamed, 15)
        rest_drain = await drain_all(producer, drained, 15)
        first = [p for _, p in got_stream]
        # The fifth was in the body when the store closed; the marks of the ones before it
        # may have been held up by the stall: with the index down when the stream closes,
        # those come again (docs/delivery.md, documented at-least-once). Nothing else may.
        assert_once([p.decode() for p in rest_stream], "after the restart")
        assert sorted(set(first) | set(rest_stream)) == [numbered(i) for i in range(total)]
        assert_ascending(rest_stream)
        assert sorted(got_drain + rest_drain) == [numbered(i) for i in range(total)], (
            f"drain {got_drain}, then {rest_drain}"
        )
        assert_ascending(rest_drain)
        wire.assert_clear_errors()
        # The bound by design: CLOSE_GRACE (2 s) for the stream's body, publish_timeout for
        # its marks, publish_timeout for the drain, CLOSE_GRACE more, and a statement's own
        # bound on the way out: about 12 s here.
        assert (not hung) & (took < 15), (
            f"close() {'still running' if hung else 'ended'} after {took:.1f} s with the "
            "index stalled (publish_timeout 3 s)"
        )


# -- 4. a fan-out cut short by its caller while the index stalls and the broker closes -----


@pytest.mark.parametrize("backend", WIRED)
@pytest.mark.parametrize("fault", ["stall", "cut"])
async def test_fan_out_timed_out_under_index_and_broker_faults_keeps_each_devices_order(
    backend: str, fault: str
) -> None:
    """enqueue_many to 30 devices under asyncio.timeout(1): its index write's answer is held
    (stall) or its connection cut, and the broker closes the store's connections. Then a
    plain command goes to every device. Where the fan-out reached the index, each device
    must get it once and before the plain command; where it did not, nothing of it."""
    async with wire_on(backend) as wire:
        operator = await wire.open()
        gateway = await wire.open(cut_off=False)
        devices = [wire.device() for _ in range(12)]
        for device in devices:
            await operator.ensure_queue(device)
        wire.index.stall(replies_only=True)
        fan_out = asyncio.ensure_future(operator.enqueue_many(devices, b"n:00000", LONG))
        await asyncio.sleep(0.3)
        await wire.close_broker()
        if fault == "cut":
            await wire.index.cut()
        wire.index.resume()
        await asyncio.sleep(0.7)
        fan_out.cancel()
        await wire.index.restore()
        try:
            outcome: Any = await asyncio.wait_for(fan_out, 20)
        except asyncio.CancelledError:
            outcome = "cancelled"
        except QueueError as exc:
            outcome = exc
            wire.failed(exc)
        except Exception as exc:
            outcome = exc
            wire.failed(exc)
        print(f"fan-out: {outcome!r}")
        plain = {}
        for device in devices:
            plain[device] = await retried(
                wire, lambda device=device: operator.enqueue(device, b"n:00001", LONG)
            )
        written = {device: [p.id for p in await gateway.get_pending(device)] for device in devices}
        wrong: dict[str, Any] = {}
        for device in devices:
            got = await drain_all(gateway, device, 20)
            expected = [b"n:00000", b"n:00001"] if len(written[device]) == 2 else [b"n:00001"]
            if got != expected:
                wrong[device] = got
        fanned = sum(len(ids) == 2 for ids in written.values())
        print(f"the fan-out reached the index for {fanned} of {len(devices)} devices")
        assert fanned in (0, len(devices)), "a fan-out is all or nothing"
        assert not wrong, f"fan-out answered {outcome!r}; devices got {wrong}"
        wire.assert_clear_errors()


# -- 5. two stores on one index: one is cut off again and again, both drain one device ----


@pytest.mark.parametrize("backend", WIRED)
async def test_drains_on_two_stores_while_one_is_cut_off_again_and_again(backend: str) -> None:
    """A direct store enqueues numbered commands to one device and drains it; a cut-off
    store drains it too (some drains under a short asyncio.timeout) while its index link
    is cut or stalled and its broker connections closed at random moments. Drains claim,
    so no command may be handed out twice, across both stores; each drain call's batch is
    in enqueue order; every accepted command is handed out; statuses end DELIVERED."""
    import random

    rng = random.Random()
    seed = rng.randrange(2**32)
    print(f"seed {seed}")
    rng.seed(seed)
    async with wire_on(backend) as wire:
        direct = await wire.open(cut_off=False)
        cut = await wire.open()
        device = wire.device()
        accepted: list[str] = []
        batches: list[tuple[str, list[bytes]]] = []
        stop = asyncio.Event()

        async def drains(store: RabbitMQStore, name: str) -> None:
            while not stop.is_set():
                try:
                    if name == "cut" and rng.random() < 0.3:
                        async with asyncio.timeout(rng.uniform(0.05, 0.5)):
                            batch = await store.drain_pending(device)
                    else:
                        batch = await store.drain_pending(device)
                    batches.append((name, batch))
                except TimeoutError:
                    pass
                except Exception as exc:
                    wire.failed(exc)
                    await asyncio.sleep(0.1)
                await asyncio.sleep(rng.uniform(0, 0.1))

        tasks = [
            asyncio.create_task(produce(stop, direct, device, accepted, rng)),
            asyncio.create_task(drains(direct, "direct")),
            asyncio.create_task(drains(cut, "cut")),
            asyncio.create_task(fault_storm(wire, stop, rng)),
        ]
        await asyncio.sleep(STORM_SECONDS)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        wire.index.resume()
        await wire.index.restore()
        rest = await drain_all(direct, device, 25)
        batches.append(("final", rest))
        got = [p for _, batch in batches for p in batch]
        for name, batch in batches:
            assert_ascending(batch, f"in one drain of {name}")
        twice = sorted(p for p, n in Counter(got).items() if n > 1)
        missing = sorted(set(numbered(i) for i in range(len(accepted))) - set(got))
        print(f"{len(accepted)} accepted, {len(got)} handed out, errors {len(wire.errors)}")
        assert not twice, f"handed out twice: {twice}"
        assert not missing, f"never handed out: {missing}"
        assert set(await statuses(direct, accepted)) == {CommandStatus.DELIVERED}
        wire.assert_clear_errors()


# -- 6. one consume stream through a storm of index cuts, stalls and broker closes ---------


@pytest.mark.parametrize("backend", WIRED)
async def test_one_stream_through_a_storm_of_index_and_broker_faults_keeps_order(
    backend: str,
) -> None:
    """A direct store enqueues numbered commands to one device; a cut-off store's single
    consume stream takes them while its index link is cut or stalled and its broker
    connections are closed at random moments (two faults at once among them). One stream
    remembers what it handed out, so nothing may come twice in it; what it hands out is in
    enqueue order; after the storm everything accepted has been handed out and reads
    DELIVERED, and the queue holds nothing live."""
    import random

    rng = random.Random()
    seed = int(os.environ.get("REPLAY_SEED") or rng.randrange(2**32))
    print(f"seed {seed}")
    rng.seed(seed)
    async with wire_on(backend) as wire:
        direct = await wire.open(cut_off=False)
        cut = await wire.open()
        device = wire.device()
        accepted: list[str] = []
        got: list[tuple[str, bytes]] = []
        stop = asyncio.Event()

        producing = asyncio.create_task(produce(stop, direct, device, accepted, rng))
        tasks = [producing, asyncio.create_task(fault_storm(wire, stop, rng))]
        consuming = asyncio.create_task(
            stream_until_handed(wire, cut, device, accepted, got, producing)
        )
        await asyncio.sleep(STORM_SECONDS)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        wire.index.resume()
        await wire.index.restore()
        with suppress(TimeoutError):
            await asyncio.wait_for(consuming, 20)
        ids = [i for i, _ in got]
        print(f"{len(accepted)} accepted, {len(got)} handed out, {len(wire.errors)} errors")
        print(f"stream ended by itself: {consuming.done()}")
        for missing in set(accepted) - set(ids):
            # A rare failure under load: say where the command was left.
            where = [m for m, _, _ in await raw_messages(wire, device) if m == missing]
            status = await direct.get_status(missing)
            print(f"not handed out: {missing} #{accepted.index(missing)} {status} {where}")
        wire.assert_clear_errors()
        assert_once(ids, "in one stream")
        assert_ascending([p for _, p in got], "in one stream")
        assert set(ids) == set(accepted), f"never handed out: {len(set(accepted) - set(ids))}"

        async def settled() -> bool:
            return set(await statuses(direct, accepted)) == {CommandStatus.DELIVERED}

        async with asyncio.timeout(10):
            while not await settled():  # noqa: ASYNC110 - polling the index
                await asyncio.sleep(0.3)
        await assert_only_stale_copies_left(wire, direct, device)


@pytest.mark.parametrize("backend", WIRED)
async def test_the_storm_stream_waits_for_the_enqueue_in_flight_when_the_storm_stops(
    backend: str,
) -> None:
    """The storm's stream, lagging one command behind (its index stalled) when the storm
    stops, while the producer's last enqueue is still in flight: that command is accepted
    once the call returns, after the stream caught up with what was accepted so far. The
    stream must hand it out too, not end on the count accepted before it returned (the
    storm's rare "one accepted command not handed out": the last one, left in the queue)."""
    async with wire_on(backend) as wire:
        direct = await wire.open(cut_off=False)
        cut = await wire.open()
        device = wire.device()
        await cut.ensure_queue(device)
        accepted: list[str] = []
        got: list[tuple[str, bytes]] = []
        stop = asyncio.Event()

        async def handed(count: int) -> None:
            async with asyncio.timeout(20):
                while len(got) < count:  # noqa: ASYNC110 - the stream's task appends
                    await asyncio.sleep(0.01)

        async def producer() -> None:
            for i in range(5):
                accepted.append(await direct.enqueue(device, numbered(i), LONG))
            await handed(5)
            # The stream's next liveness read waits: #5 is received, not handed out.
            wire.index.stall()
            accepted.append(await direct.enqueue(device, numbered(5), LONG))
            in_flight = asyncio.ensure_future(direct.enqueue(device, numbered(6), LONG))
            stop.set()
            wire.index.resume()
            await handed(6)
            # The call of #6 returns (it is accepted) once the stream has caught up.
            accepted.append(await in_flight)

        producing = asyncio.create_task(producer())
        consuming = asyncio.create_task(
            stream_until_handed(wire, cut, device, accepted, got, producing)
        )
        await asyncio.wait_for(producing, 30)
        with suppress(TimeoutError):
            await asyncio.wait_for(consuming, 20)
        ids = [i for i, _ in got]
        assert_once(ids, "in one stream")
        assert_ascending([p for _, p in got], "in one stream")
        missing = [accepted.index(i) for i in set(accepted) - set(ids)]
        assert not missing, f"never handed out: {missing} of {len(accepted)}"
        wire.assert_clear_errors()
