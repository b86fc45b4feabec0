"""RedisStore beyond the contract: other processes, key TTLs, restarts, the outbox primitives."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from amqp_queue.state import (
    ClaimOutcomeUnknown,
    CommandNotFound,
    CommandStatus,
    RedisStore,
    StateError,
    open_state,
)
from amqp_queue.state.redis_store import KEY_TTL_MARGIN
from tests.backends import REDIS_URL, redis_prefix
from tests.redis_faults import LosesReplies
from tests.support import FakeClock, eventually, unique

REPO = Path(__file__).resolve().parent.parent

DRAIN_WORKER = """
import asyncio, json, sys

from amqp_queue.state import RedisStore


async def main(url: str, prefix: str, device: str) -> None:
    batches = []
    async with await RedisStore.connect(url, prefix=prefix) as store:
        await store.client.rpush(prefix + "test:ready", "1")
        while True:
            done = await store.client.exists(prefix + "test:done")
            batch = await store.drain_pending(device)
            if batch:
                batches.append([payload.decode() for payload in batch])
            elif done:
                break
    sys.stdout.write(json.dumps(batches))


asyncio.run(main(*sys.argv[1:]))
"""


@asynccontextmanager
async def redis_store(**options: Any) -> AsyncIterator[RedisStore]:
    async with (
        redis_prefix() as prefix,
        await RedisStore.connect(REDIS_URL, prefix=prefix, **options) as store,
    ):
        yield store


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Polls an async condition (another process's progress) for up to 20 seconds."""
    for _ in range(1_000):
        if await condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
async def test_two_processes_draining_one_device_get_every_command_exactly_once(
    tmp_path: Path,
) -> None:
    script = tmp_path / "drain_worker.py"
    script.write_text(DRAIN_WORKER)
    sent = [f"cmd-{n}" for n in range(300)]
    async with redis_store() as store:
        workers = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                REDIS_URL,
                store.prefix,
                "dev-1",
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]

        async def both_ready() -> bool:
            return int(await store.client.llen(f"{store.prefix}test:ready")) == 2

        await wait_for(both_ready, "both workers draining")
        for payload in sent:
            await store.enqueue("dev-1", payload.encode(), 600)
        await store.client.set(f"{store.prefix}test:done", "1")
        outputs = [await worker.communicate() for worker in workers]

        assert [worker.returncode for worker in workers] == [0, 0]
        per_worker = [json.loads(stdout) for stdout, _ in outputs]
        batches = [batch for worker_batches in per_worker for batch in worker_batches]
        received = [payload for batch in batches for payload in batch]
        assert sorted(received) == sorted(sent)
        assert len(received) == len(set(received))
        assert all(per_worker), "both processes should have drained some commands"
        for batch in batches:
            assert batch == sorted(batch, key=sent.index)
        assert await store.get_pending("dev-1") == []


@pytest.mark.parametrize("clock_offset", [timedelta(0), timedelta(days=3650)])
async def test_key_ttls_follow_the_store_clock_not_redis_time(clock_offset: timedelta) -> None:
    """Keys outlive the command's life plus the retention, however far the clock is from Redis's."""
    clock = FakeClock()
    clock.now += clock_offset
    retention = timedelta(hours=1)
    async with redis_store(clock=clock, retention=retention) as store:
        command_id = await store.enqueue_or_update("dev-1", "setpoint", b"20", 60)
        open_ttl = await store.client.pttl(f"{store.prefix}cmd:{command_id}")
        device_ttl = await store.client.pttl(f"{store.prefix}dev:dev-1")
        types_ttl = await store.client.pttl(f"{store.prefix}types:dev-1")
        await store.drain_pending("dev-1")
        finished_ttl = await store.client.pttl(f"{store.prefix}cmd:{command_id}")

    expected_open = (timedelta(seconds=60) + retention + KEY_TTL_MARGIN) // timedelta(
        milliseconds=1
    )
    expected_finished = (retention + KEY_TTL_MARGIN) // timedelta(milliseconds=1)
    assert expected_open - 5_000 < open_ttl <= expected_open
    assert expected_open - 5_000 < device_ttl <= expected_open
    assert expected_open - 5_000 < types_ttl <= expected_open
    assert expected_finished - 5_000 < finished_ttl <= expected_finished


async def test_cleanup_sweeps_expired_commands_in_batches(clock: FakeClock) -> None:
    async with redis_store(clock=clock) as store:
        for n in range(1_200):
            await store.enqueue(f"dev-{n % 7}", b"x", 5)
        live = await store.enqueue("dev-0", b"live", 600)
        clock.advance(6)

        assert await store.cleanup() == 1_200
        assert await store.get_status(live) == CommandStatus.PENDING
        assert await store.client.zcard(f"{store.prefix}expiry") == 1


async def test_a_write_sent_again_after_a_lost_reply_changes_nothing(clock: FakeClock) -> None:
    # redis-py retries a command whose connection failed or timed out (3 times by default):
    # a script that ran but whose reply was lost runs again with the same commands. It must
    # not end the typed command as replaced by itself, reopen a delivered one, or add twice.
    async with redis_store(clock=clock) as store:
        typed = store.build("dev-1", "setpoint", b"20", 600)
        plain = store.build("dev-1", None, b"p", 600)
        await store.add([typed, plain])
        assert await store.add([typed, plain]) == 0

        assert await store.get_status(typed.id) == CommandStatus.PENDING
        assert [c.id for c in await store.get_pending("dev-1")] == [typed.id, plain.id]
        assert await store.drain_pending("dev-1") == [b"20", b"p"]
        await store.add([typed, plain])
        assert await store.get_status(typed.id) == CommandStatus.DELIVERED
        assert await store.get_status(plain.id) == CommandStatus.DELIVERED
        assert await store.get_pending("dev-1") == []


@pytest.fixture
def loses_replies() -> type[LosesReplies]:
    class Losing(LosesReplies):
        pass

    return Losing


async def test_a_drain_whose_reply_is_lost_hands_out_its_commands_when_sent_again(
    loses_replies: type[LosesReplies],
) -> None:
    # redis-py sends a command again when its connection failed (3 retries by default): a
    # claim that ran, and ran again, must answer the same, not "nothing left to take".
    async with redis_store(connection_class=loses_replies) as store:
        await store.enqueue("dev-1", b"a", 600)
        await store.enqueue("dev-1", b"b", 600)
        loses_replies.lose = 1

        assert await store.drain_pending("dev-1") == [b"a", b"b"]
        assert await store.drain_pending("dev-1") == []


async def test_a_cancel_whose_exec_reply_is_lost_succeeds(
    loses_replies: type[LosesReplies],
) -> None:
    # The cancel ran, its reply was lost, and redis-py turns a connection lost while WATCHing
    # into a WatchError: the retried attempt finds the command cancelled by this very call,
    # which must answer as the cancel it is, not "already cancelled".
    async with redis_store(connection_class=loses_replies) as store:
        command_id = await store.enqueue("dev-1", b"a", 600)
        loses_replies.only, loses_replies.lose = b"EXEC", 1

        await store.cancel_command(command_id, by="ops")

        assert loses_replies.lose == 0, "the EXEC reply was lost"
        assert await store.get_status(command_id) == CommandStatus.CANCELLED
        with pytest.raises(CommandNotFound, match="already cancelled"):
            await store.cancel_command(command_id, by="ops")


async def test_a_confirm_whose_exec_reply_is_lost_says_it_confirmed(
    loses_replies: type[LosesReplies],
) -> None:
    # As above for a confirm: it must say it confirmed, or RabbitMQStore would leave the
    # publish of the now ready command to the outbox relay.
    async with redis_store(connection_class=loses_replies) as store:
        command_id = await store.enqueue_with_confirmation("dev-1", "reboot", b"a", 600)
        loses_replies.only, loses_replies.lose = b"EXEC", 1

        record, changed = await store.confirm_changed(command_id, by="ops")

        assert loses_replies.lose == 0, "the EXEC reply was lost"
        assert changed
        assert record.confirmed
        assert not (await store.confirm_changed(command_id, by="ops"))[1]


async def _a_drain_of_a_whose_replies_are_all_lost(
    store: RedisStore, loses_replies: type[LosesReplies]
) -> None:
    """Enqueues ``a`` for dev-1 and drains it while every reply is lost (retries included)."""
    await store.enqueue("dev-1", b"a", 600)
    loses_replies.lose = 10
    with pytest.raises(ClaimOutcomeUnknown):
        await store.drain_pending("dev-1")
    loses_replies.lose = 0


async def test_a_drain_whose_replies_stay_lost_hands_its_commands_to_the_next_drain(
    loses_replies: type[LosesReplies],
) -> None:
    # Every retry's reply lost too: the drain fails, saying the claim may have landed; the
    # next drain of the device hands out what it took, rather than leaving them delivered
    # to nobody.
    async with redis_store(connection_class=loses_replies) as store:
        await _a_drain_of_a_whose_replies_are_all_lost(store, loses_replies)
        await store.enqueue("dev-1", b"b", 600)

        assert await store.drain_pending("dev-1") == [b"a", b"b"]


async def test_a_drain_cancelled_while_it_looks_up_a_lost_claim_leaves_it_to_the_next(
    loses_replies: type[LosesReplies],
) -> None:
    async with redis_store(connection_class=loses_replies) as store:
        await _a_drain_of_a_whose_replies_are_all_lost(store, loses_replies)
        loses_replies.stall = True
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await store.drain_pending("dev-1")
        loses_replies.stall = False

        assert await store.drain_pending("dev-1") == [b"a"]


async def test_a_lost_claim_that_never_ran_claims_nothing_when_looked_up_later(
    loses_replies: type[LosesReplies],
) -> None:
    # Its commands stay open: a later drain's window must not take them (their messages
    # may be another consumer's by then), only what that window holds.
    async with redis_store(connection_class=loses_replies) as store:
        first = await store.enqueue("dev-1", b"a", 600)
        second = await store.enqueue("dev-1", b"b", 600)
        loses_replies.refuse = 10
        with pytest.raises(ClaimOutcomeUnknown):
            await store.claim("dev-1", [first])
        loses_replies.refuse = 0

        assert [record.id for record in await store.claim("dev-1", [second])] == [second]
        assert await store.get_status(first) == CommandStatus.PENDING


async def test_a_late_copy_of_a_claim_found_never_to_have_run_claims_nothing(
    loses_replies: type[LosesReplies],
) -> None:
    # Redis stalled: the claim was given up on, and the next drain's lookup found no answer.
    # A copy of the claim still queued on a dead connection may run after that lookup; it
    # must not take the command, which nobody would then hand out.
    async with redis_store(connection_class=loses_replies) as store:
        command_id = await store.enqueue("dev-1", b"a", 600)
        loses_replies.refuse = 10
        with pytest.raises(ClaimOutcomeUnknown):
            await store.claim("dev-1", [command_id])
        loses_replies.refuse = 0
        [token] = store._claims._doubtful["dev-1"]
        # The lookup (no answer), then a window holding only another, unknown, command.
        assert await store.claim("dev-1", ["6f1c2c1e-0000-4000-8000-000000000003"]) == []
        assert await store.get_status(command_id) == CommandStatus.PENDING

        late_copy = await store._claim_script(
            keys=[*store._indexes, store._device_key("dev-1")],
            args=store._args(store.clock(), [token, "600000", "0", "0", "0", command_id]),
        )

        assert late_copy == []
        assert await store.get_status(command_id) == CommandStatus.PENDING
        assert await store.drain_pending("dev-1") == [b"a"]


async def test_cancel_racing_a_drain_has_exactly_one_winner() -> None:
    async with redis_store() as store:
        for n in range(40):
            command_id = await store.enqueue("dev-1", f"{n}".encode(), 60)
            drained, cancelled = await asyncio.gather(
                store.drain_pending("dev-1"),
                store.cancel_command(command_id),
                return_exceptions=True,
            )
            status = await store.get_status(command_id)
            if drained == [f"{n}".encode()]:
                assert isinstance(cancelled, CommandNotFound)
                assert status == CommandStatus.DELIVERED
            else:
                assert (drained, cancelled) == ([], None)
                assert status == CommandStatus.CANCELLED


@asynccontextmanager
async def private_redis(data_dir: Path) -> AsyncIterator[str]:
    """A redis-server of our own with AOF fsynced on every write; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = await asyncio.create_subprocess_exec(
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--logfile",
        str(data_dir / "redis.log"),
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        async with Redis.from_url(url) as client:

            async def answers() -> bool:
                try:
                    return bool(await client.ping())
                except RedisConnectionError:
                    return False

            await wait_for(answers, "the private redis-server")
        yield url
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_state_survives_a_redis_crash_with_aof(tmp_path: Path, clock: FakeClock) -> None:
    async with private_redis(tmp_path) as url, await RedisStore.connect(url, clock=clock) as before:
        plain = await before.enqueue("dev-1", b"plain", 600)
        old = await before.enqueue_or_update("dev-1", "setpoint", b"20", 600)
        new = await before.enqueue_or_update("dev-1", "setpoint", b"21", 600)
        waiting = await before.enqueue_with_confirmation("dev-1", "unlock", b"door", 600)
        delivered = await before.enqueue("dev-2", b"gone", 600)
        assert await before.drain_pending("dev-2") == [b"gone"]
        cancelled = await before.enqueue("dev-1", b"no", 600)
        await before.cancel_command(cancelled)
    # private_redis killed the server with SIGKILL: no shutdown, no final save.

    async with private_redis(tmp_path) as url, await RedisStore.connect(url, clock=clock) as after:
        assert [c.id for c in await after.get_pending("dev-1")] == [plain, new, waiting]
        assert [c.id for c in await after.get_pending_confirmations("dev-1")] == [waiting]
        assert await after.get_status(old) == CommandStatus.SUPERSEDED
        assert await after.get_status(delivered) == CommandStatus.DELIVERED
        assert await after.get_status(cancelled) == CommandStatus.CANCELLED
        assert await after.client.pttl(f"{after.prefix}cmd:{plain}") > 0

        clock.advance(1)
        newest = await after.enqueue_or_update("dev-1", "setpoint", b"22", 600)
        clock.advance(1)
        await after.confirm_command(waiting)

        assert await after.get_status(new) == CommandStatus.SUPERSEDED
        assert await after.drain_pending("dev-1") == [b"plain", b"22", b"door"]
        assert await after.get_status(newest) == CommandStatus.DELIVERED


async def connected_names(client: Redis) -> list[str]:
    return [entry["name"] for entry in await client.client_list()]


async def test_close_closes_an_owned_client_and_leaves_a_given_one_open() -> None:
    async with redis_prefix() as prefix, Redis.from_url(REDIS_URL) as observer:
        given_name, owned_name = unique("given-"), unique("owned-")
        given = Redis.from_url(REDIS_URL, client_name=given_name)
        async with RedisStore(given, prefix=prefix) as store:
            await store.enqueue("dev-1", b"x", 60)
        async with await RedisStore.connect(REDIS_URL, prefix=prefix, client_name=owned_name):
            assert owned_name in await connected_names(observer)

        async def owned_gone() -> bool:
            return owned_name not in await connected_names(observer)

        # The server drops a closed client when its loop next reads that socket, which under
        # load can come after the observer's CLIENT LIST (seen once in CI).
        await eventually(owned_gone, 5)
        assert given_name in await connected_names(observer)
        await given.aclose()


async def test_open_state_opens_redis_urls_with_their_prefix() -> None:
    async with redis_prefix() as prefix:
        store = await open_state(f"{REDIS_URL}?prefix={prefix}")
        async with store:
            assert isinstance(store, RedisStore)
            assert store.prefix == prefix
            command_id = await store.enqueue("dev-1", b"x", 60)
            assert await store.client.exists(f"{prefix}cmd:{command_id}") == 1


async def test_unreachable_redis_raises_state_error() -> None:
    with pytest.raises(StateError):
        await RedisStore.connect("redis://127.0.0.1:1/0")


async def test_a_client_that_decodes_responses_is_refused() -> None:
    client = Redis.from_url(REDIS_URL, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisStore(client)
    await client.aclose()


def test_importing_state_does_not_need_redis() -> None:
    import subprocess

    code = "import sys, state, amqp_queue; print('redis' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "False"


async def test_more_calls_at_once_than_the_pool_has_connections_wait_for_one() -> None:
    """redis-py's pool holds 100 connections and refused the 101st call at once ("Too many
    connections"): 400 streams' liveness checks, or an operator's burst, failed."""
    async with (
        redis_prefix() as prefix,
        await RedisStore.connect(REDIS_URL, prefix=prefix) as store,
    ):
        ids = [await store.enqueue(f"dev-{n % 20}", b"x", 600) for n in range(40)]
        statuses = await asyncio.gather(*(store.get_status(ids[n % 40]) for n in range(400)))
        assert set(statuses) == {CommandStatus.PENDING}
