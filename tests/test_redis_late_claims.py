"""Redis drains whose claim replies are lost: resolved within the drain when Redis comes back
soon, and a claim looked up late hands out nothing that expired meanwhile. A released
command's device is listed again among the devices with open commands."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest

from amqp_queue import ClaimOutcomeUnknown, CommandStatus, RabbitMQConfig, RabbitMQStore
from amqp_queue.state import RedisStore, StateError
from tests.backends import REDIS_URL, redis_prefix
from tests.drain_claims import drained
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.redis_faults import LosesReplies
from tests.support import unique


class _Losing(LosesReplies):
    pass


class _Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


async def _drain_with_lost_replies(
    device: str, lost: int, clock: _Clock | None = None
) -> tuple[list[bytes], list[bytes], list[CommandStatus]]:
    """Enqueues three commands, drains with ``lost`` claim replies lost, then (``clock``
    moved two minutes on, when given) drains again; returns both drains' payloads and the
    statuses."""
    exchange = unique("test.")
    async with redis_prefix() as prefix:
        state = await RedisStore.connect(
            REDIS_URL, prefix=prefix, connection_class=_Losing, clock=clock or _Clock()
        )
        connection = await aio_pika.connect_robust(AMQP_URL)
        store = RabbitMQStore(connection, RabbitMQConfig(exchange=exchange), state=state)
        try:
            async with store:
                ids = [await store.enqueue(device, f"c{n}".encode(), 60) for n in range(3)]
                _Losing.only = state._claim_script.sha.encode()
                _Losing.lose = lost
                first: list[bytes] = []
                with contextlib.suppress(ClaimOutcomeUnknown, StateError):
                    first = await store.drain_pending(device)
                _Losing.lose = 0
                if clock is not None:
                    clock.now += timedelta(seconds=120)  # every command has expired
                second = await store.drain_pending(device)
                statuses = [await store.get_status(i) for i in ids]
        finally:
            _Losing.lose = 0
            _Losing.only = None
            await connection.close()
            await state.close()
            await delete_namespace(exchange, [device])
    return first, second, statuses


async def test_a_claim_whose_replies_are_lost_a_few_times_is_answered_within_the_drain() -> None:
    """Four lost replies (a dropped connection, a Redis restart): the claim is sent again with
    its token until it answers, so the drain hands its commands out itself. Given up after
    three, the next reader of the device had to be a drain: a ``consume`` found the commands
    delivered and dropped their messages."""
    first, second, statuses = await _drain_with_lost_replies("dev-1", lost=4)

    assert first == [b"c0", b"c1", b"c2"]
    assert second == []
    assert statuses == [CommandStatus.DELIVERED] * 3


async def test_a_lost_claim_looked_up_after_its_commands_expired_hands_out_none() -> None:
    """The replies stay lost past the drain's bound; the device's next drain comes after the
    commands' TTL: the lost claim's answer is looked up, and its expired commands end
    EXPIRED instead of reaching the device."""
    first, second, statuses = await _drain_with_lost_replies("dev-2", lost=100, clock=_Clock())

    assert first == []
    assert second == []
    assert statuses == [CommandStatus.EXPIRED] * 3


async def test_a_released_commands_device_is_listed_again() -> None:
    async with redis_prefix() as prefix:
        state = await RedisStore.connect(REDIS_URL, prefix=prefix)
        try:
            command_id = await state.enqueue("dev-r", b"x", 600)
            handed = await drained(state, "dev-r", [command_id])
            assert [record.id for record in handed] == [command_id]
            assert await state.devices_with_open() == []
            await state.release(handed, [])

            assert await state.get_status(command_id) == CommandStatus.PENDING
            assert [d.device_id for d in await state.devices_with_open()] == ["dev-r"]
        finally:
            await state.close()


@pytest.mark.parametrize("published_again", [False, True])
async def test_a_released_expired_command_is_finished_and_awaits_no_outcome(
    published_again: bool,
) -> None:
    clock = _Clock()
    async with redis_prefix() as prefix:
        state = await RedisStore.connect(REDIS_URL, prefix=prefix, clock=clock)
        try:
            command_id = await state.enqueue("dev-e", b"x", 60, outcome_timeout=30)
            handed = await drained(state, "dev-e", [command_id])
            clock.now += timedelta(seconds=90)
            if published_again:
                await state.release([], handed)
            else:
                await state.release(handed, [])
            clock.now += timedelta(seconds=60)  # past the outcome deadline
            await state.cleanup()

            assert await state.get_status(command_id) == CommandStatus.EXPIRED
        finally:
            await state.close()


async def test_a_consume_after_a_claim_left_in_doubt_gets_its_commands() -> None:
    """The replies stay lost past the drain's bound: the drain raises, having handed out
    nothing, and requeues the messages. The device then reads with ``consume``, not a second
    drain: the lost claim is looked up and what it took given back, so the stream hands the
    commands out instead of dropping their messages as delivered to nobody."""
    exchange = unique("test.")
    async with redis_prefix() as prefix:
        state = await RedisStore.connect(REDIS_URL, prefix=prefix, connection_class=_Losing)
        connection = await aio_pika.connect_robust(AMQP_URL)
        store = RabbitMQStore(connection, RabbitMQConfig(exchange=exchange), state=state)
        try:
            async with store:
                payloads = [f"c{n}".encode() for n in range(3)]
                ids = [await store.enqueue("dev-4", payload, 600) for payload in payloads]
                _Losing.only = state._claim_script.sha.encode()
                _Losing.lose = 100
                with pytest.raises(ClaimOutcomeUnknown):
                    await store.drain_pending("dev-4")
                _Losing.lose = 0

                got: list[bytes] = []
                async with store.consume("dev-4") as stream:
                    async for command in stream:
                        got.append(command.payload)
                        if len(got) == len(payloads):
                            break

                assert got == payloads
                assert [await store.get_status(i) for i in ids] == [CommandStatus.DELIVERED] * 3
        finally:
            _Losing.lose = 0
            _Losing.only = None
            await connection.close()
            await state.close()
            await delete_namespace(exchange, ["dev-4"])


class _LosesClaims(LosesReplies):
    lose = 0
    only: bytes | None = None


async def test_a_lost_claim_looked_up_later_leaves_alone_what_another_process_took_over() -> None:
    """A claim whose reply was lost took X; another process read X's redelivered message,
    ended that claim, claimed X and handed it over. Looked up afterwards (any read of the
    device settles the doubt), the lost claim must not give X back: its answer names X, but
    X is no longer under its claim. Giving it back reopened X, and the relay published it
    again: a second delivery (found by a review)."""
    async with redis_prefix() as prefix:
        lost = await RedisStore.connect(REDIS_URL, prefix=prefix, connection_class=_LosesClaims)
        other = await RedisStore.connect(REDIS_URL, prefix=prefix)
        try:
            command_id = await lost.enqueue("dev-1", b"x", 600)
            _LosesClaims.only, _LosesClaims.lose = lost._claim_script.sha.encode(), 10**6
            with pytest.raises(StateError):
                await lost.claim("dev-1", [command_id])
            _LosesClaims.only, _LosesClaims.lose = None, 0

            assert await other.end_claims([command_id]) == 1
            handed = await drained(other, "dev-1", [command_id])
            assert [record.id for record in handed] == [command_id]
            await lost.deliverable([command_id])  # settles the doubtful claim

            assert await other.get_status(command_id) == CommandStatus.DELIVERED
            assert not await other.is_deliverable(command_id)
        finally:
            await lost.close()
            await other.close()
