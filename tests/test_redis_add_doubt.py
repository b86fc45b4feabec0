"""An enqueue whose reply Redis never sent: the index never says "not written" of a command it
holds.

Many enqueues run on a private Redis (AOF, ``appendfsync always``) taken down under them by
SIGKILL or SIGTERM and started again on its append-only file. A script that ran and reached
the AOF comes back with it, though its reply never left: Redis writes the AOF before it
answers, and a shutdown handled in the same turn of its event loop answers nobody. The client
only sees its connection close. Each call's payload is unique, so afterwards the keys say
which calls were written, and

- every enqueue that returned an id is held under that id;
- no enqueue that raised :class:`StateError` without saying its outcome is unknown is held
  (such a command was later published and delivered: "stale" in the fault harness, and a
  caller that enqueues again on the error sends the device the command twice).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import pytest
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from amqp_queue.state import RedisStore, StateError
from amqp_queue.state.redis_add_doubt import FENCE_TTL
from amqp_queue.state.redis_encoding import milliseconds
from tests.backends import REDIS_URL, redis_prefix
from tests.faults.private_redis import STOPS, PrivateRedis, private_redis

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WORKERS = 16
SECONDS = 3.0
PER_DEVICE = 200
"""Commands a worker enqueues for one device before the next: well under a device's limit."""
UNKNOWN = "outcome is unknown"
"""What the message of a StateError says when the index could not tell."""


@dataclass
class Calls:
    returned: dict[bytes, str] = field(default_factory=dict)
    refused: dict[bytes, str] = field(default_factory=dict)
    """Payloads of calls that raised StateError saying nothing was written, with the message."""
    unknown: set[bytes] = field(default_factory=set)
    met: int = 0
    """Calls under way while Redis was down: a call whose reply was lost waits for Redis to
    say whether it was written, so refusals alone do not show that the outage was met."""


async def _storm(store: RedisStore, server: PrivateRedis, mode: str) -> Calls:
    """``WORKERS`` enqueue loops with unique payloads for ``SECONDS``; Redis is taken down in
    ``mode`` once, early, and started again a second later."""
    calls = Calls()
    numbers = itertools.count()
    stop = time.monotonic() + SECONDS

    spans: list[tuple[float, float]] = []
    outage: list[float] = []

    async def enqueue(worker: int) -> None:
        sent = 0
        while time.monotonic() < stop:
            payload = f"payload-{next(numbers)}".encode()
            device = f"dev-{worker}-{sent // PER_DEVICE}"
            sent += 1
            started = time.monotonic()
            try:
                calls.returned[payload] = await store.enqueue(device, payload, 3600)
            except StateError as exc:
                if UNKNOWN in str(exc):
                    calls.unknown.add(payload)
                else:
                    calls.refused[payload] = str(exc)
                await asyncio.sleep(0.01)
            finally:
                spans.append((started, time.monotonic()))

    async def restart() -> None:
        await asyncio.sleep(0.7)
        outage.append(time.monotonic())
        await server.restart(mode, down_for=1.0)
        outage.append(time.monotonic())

    await asyncio.gather(restart(), *(enqueue(worker) for worker in range(WORKERS)))
    down, up = outage
    calls.met = sum(1 for started, ended in spans if started < up and ended > down)
    return calls


async def _held(store: RedisStore) -> dict[bytes, str]:
    """Every command in the index: payload to id."""
    held: dict[bytes, str] = {}
    async for key in store.client.scan_iter(match=f"{store.prefix}cmd:*", count=1000):
        payload, command_id = await store.client.hmget(key, ["payload", "id"])
        assert isinstance(payload, bytes)
        assert isinstance(command_id, bytes)
        held[payload] = command_id.decode()
    return held


@pytest.mark.parametrize("mode", sorted(STOPS))
async def test_an_enqueue_that_raised_wrote_nothing_and_one_that_returned_is_held(
    mode: str,
) -> None:
    async with private_redis() as server:
        store = await RedisStore.connect(server.url)
        try:
            calls = await _storm(store, server, mode)
            held = await _held(store)
        finally:
            await store.close()

    assert calls.returned, "no enqueue went through"
    assert calls.met, "no enqueue met the outage"
    lost = {p for p, command_id in calls.returned.items() if held.get(p) != command_id}
    written = {payload: calls.refused[payload] for payload in calls.refused if payload in held}
    assert not lost
    assert not written, (
        f"{len(written)} of {len(calls.refused)} enqueues raised 'not written' yet were "
        f"written ({len(calls.returned)} returned, {len(calls.unknown)} unknown): "
        f"{sorted(set(written.values()))}"
    )


@pytest.mark.parametrize("mode", sorted(STOPS))
async def test_a_client_that_resends_never_hears_not_written_of_a_held_command(mode: str) -> None:
    # Redis(host=...) resends a command whose reply was lost (ten times): its last attempt
    # may meet a refusal (LOADING while the AOF replays) though an earlier one was written.
    async with private_redis() as server:
        client = redis.asyncio.Redis.from_url(
            server.url, retry=Retry(ExponentialBackoff(cap=0.2, base=0.01), 10)
        )
        store = RedisStore(client)
        try:
            calls = await _storm(store, server, mode)
            held = await _held(store)
        finally:
            await store.close()
            await client.aclose()

    assert calls.returned, "no enqueue went through"
    lost = {p for p, command_id in calls.returned.items() if held.get(p) != command_id}
    written = {payload: calls.refused[payload] for payload in calls.refused if payload in held}
    assert not lost
    assert not written, (
        f"{len(written)} of {len(calls.refused)} enqueues raised 'not written' yet were "
        f"written: {sorted(set(written.values()))}"
    )


async def test_an_add_found_unwritten_writes_nothing_should_it_still_arrive() -> None:
    # The lookup after a lost reply said "not written"; the add itself, on a connection the
    # client gave up on while Redis stalled, comes after it: the caller was told it failed.
    async with (
        redis_prefix() as prefix,
        await RedisStore.connect(REDIS_URL, prefix=prefix) as store,
    ):
        late = store.build("dev-1", None, b"late", 600)
        fence = [*store._args(store.clock()), str(milliseconds(FENCE_TTL)), late.id]
        assert await store._add_lookup(keys=store._indexes, args=fence) == 0

        await store.add([late])
        fresh = await store.enqueue("dev-1", b"fresh", 600)

        assert await store.get(late.id) is None
        assert [command.id for command in await store.get_pending("dev-1")] == [fresh]


async def test_an_enqueue_while_redis_is_down_fails_at_once() -> None:
    # Refused a connection, the add was never sent: nothing to look up, no wait for Redis.
    async with private_redis() as server:
        store = await RedisStore.connect(server.url)
        try:
            await server.stop("kill")
            started = time.monotonic()
            with pytest.raises(StateError) as raised:
                await store.enqueue("dev-1", b"during", 600)
            assert time.monotonic() - started < 1.0
            assert UNKNOWN not in str(raised.value)
        finally:
            await store.close()


class _MarksFail(RedisStore):
    """Redis gone between a write's publish marks and its add, as a kill lands."""

    async def mark_published(self, command_ids: Collection[str]) -> None:
        raise StateError("redis mark published failed: Connection closed by server.")


async def test_a_write_whose_publish_marks_fail_after_its_add_says_it_was_written() -> None:
    # The group commit's write carries new commands and the publish marks of earlier ones.
    # With the marks failing after the add (Redis killed between the two), the write raised
    # "not written" for commands Redis held, which the relay then published and devices
    # received. The add's answer stands; the lost mark costs a second publish at most.
    async with redis_prefix() as prefix:
        store = await _MarksFail.connect(REDIS_URL, prefix=prefix)
        try:
            earlier = await store.enqueue("dev-1", b"earlier", 600)
            record = store.build("dev-1", None, b"new", 600)
            assert await store.write([record], [earlier]) == 0
            assert await store.get(record.id) is not None
            with pytest.raises(StateError):
                await store.write([], [earlier])  # marks alone: their failure is the answer
        finally:
            await store.close()
