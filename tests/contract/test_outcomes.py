"""Rule 9: outcomes after delivery, reported once (the same report again is harmless), and
an outcome deadline that ends a silent command TIMED_OUT at cleanup."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

from amqp_queue import (
    CommandNotFound,
    CommandStatus,
    InvalidInput,
    InvalidPayload,
    Limits,
    OutcomeRejected,
    QueueError,
    Store,
)
from tests.backends import commands_held
from tests.conftest import OpenStore
from tests.support import FakeClock


async def delivered(store: Store, payload: bytes = b"cmd", **options: object) -> str:
    command_id = await store.enqueue("dev-1", payload, 600, **options)  # type: ignore[arg-type]
    assert payload in await store.drain_pending("dev-1")
    return command_id


async def test_a_completed_command_succeeds_and_keeps_its_result(
    store: Store, clock: FakeClock
) -> None:
    command_id = await delivered(store)
    assert await store.get_outcome(command_id) is None

    await store.complete_command(command_id, b"ok: 42")

    assert await store.get_status(command_id) == CommandStatus.SUCCEEDED
    outcome = await store.get_outcome(command_id)
    assert outcome is not None
    assert (outcome.status, outcome.result, outcome.reason) == (
        CommandStatus.SUCCEEDED,
        b"ok: 42",
        None,
    )
    assert outcome.reported_at == clock()


async def test_a_failed_command_fails_and_keeps_its_reason(store: Store) -> None:
    command_id = await delivered(store)

    await store.fail_command(command_id, "battery too low")

    assert await store.get_status(command_id) == CommandStatus.FAILED
    outcome = await store.get_outcome(command_id)
    assert outcome is not None
    assert (outcome.status, outcome.result, outcome.reason) == (
        CommandStatus.FAILED,
        None,
        "battery too low",
    )


async def test_the_same_report_twice_is_harmless(store: Store, clock: FakeClock) -> None:
    completed = await delivered(store, b"one")
    failed = await delivered(store, b"two")
    await store.complete_command(completed)
    await store.fail_command(failed, "no")
    first = await store.get_outcome(completed)
    clock.advance(5)

    await store.complete_command(completed)
    await store.fail_command(failed, "no")

    assert await store.get_outcome(completed) == first
    assert await store.get_status(completed) == CommandStatus.SUCCEEDED
    assert await store.get_status(failed) == CommandStatus.FAILED


async def test_a_different_second_report_is_refused(store: Store) -> None:
    command_id = await delivered(store)
    await store.complete_command(command_id, b"first")

    with pytest.raises(OutcomeRejected) as raised:
        await store.fail_command(command_id, "changed my mind")
    with pytest.raises(OutcomeRejected):
        await store.complete_command(command_id, b"another result")

    assert isinstance(raised.value, QueueError)
    assert raised.value.command_id == command_id
    outcome = await store.get_outcome(command_id)
    assert outcome is not None
    assert (outcome.status, outcome.result) == (CommandStatus.SUCCEEDED, b"first")


async def test_only_a_delivered_command_takes_an_outcome(store: Store, clock: FakeClock) -> None:
    pending = await store.enqueue("dev-1", b"p", 600)
    awaiting = await store.enqueue_with_confirmation("dev-1", "a", b"a", 600)
    cancelled = await store.enqueue("dev-1", b"c", 600)
    await store.cancel_command(cancelled)
    superseded = await store.enqueue_or_update("dev-1", "t", b"s1", 600)
    await store.enqueue_or_update("dev-1", "t", b"s2", 600)
    expired = await store.enqueue("dev-2", b"e", 5)
    clock.advance(10)

    for command_id in (pending, awaiting, cancelled, superseded, expired):
        with pytest.raises(OutcomeRejected):
            await store.complete_command(command_id)
        with pytest.raises(OutcomeRejected):
            await store.fail_command(command_id, "why")
        assert await store.get_outcome(command_id) is None
    assert await store.get_status(pending) == CommandStatus.PENDING
    assert await store.get_status(awaiting) == CommandStatus.AWAITING_CONFIRMATION


async def test_an_unknown_command_has_no_outcome(store: Store) -> None:
    for command_id in ("2b7f2d52-4f0e-4d4e-9a41-7d0a8f0f6b11", "not-a-uuid"):
        with pytest.raises(CommandNotFound):
            await store.complete_command(command_id)
        with pytest.raises(CommandNotFound):
            await store.fail_command(command_id, "x")
        with pytest.raises(CommandNotFound):
            await store.get_outcome(command_id)


async def test_a_bad_result_or_reason_is_refused_before_anything_is_written(
    open_store: OpenStore,
) -> None:
    limits = Limits(max_payload_bytes=16, max_reason_length=8)
    async with open_store(limits=limits) as store:
        command_id = await delivered(store)
        with pytest.raises(InvalidPayload):
            await store.complete_command(command_id, b"x" * 17)
        with pytest.raises(InvalidPayload):
            await store.complete_command(command_id, "text")  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            await store.fail_command(command_id, "r" * 9)
        with pytest.raises(InvalidInput):
            await store.fail_command(command_id, b"bytes")  # type: ignore[arg-type]

        assert await store.get_status(command_id) == CommandStatus.DELIVERED
        await store.complete_command(command_id, b"x" * 16)


async def test_a_silent_command_times_out_at_cleanup_after_its_outcome_deadline(
    store: Store, clock: FakeClock
) -> None:
    silent = await delivered(store, b"silent", outcome_timeout=30)
    answered = await delivered(store, b"answered", outcome_timeout=timedelta(seconds=30))
    no_deadline = await delivered(store, b"free")
    clock.advance(20)
    await store.complete_command(answered, b"done")
    assert await store.cleanup() == 0
    assert await store.get_status(silent) == CommandStatus.DELIVERED

    clock.advance(11)
    assert await store.cleanup() == 0  # counts expired commands only, as rule 6 says

    assert await store.get_status(silent) == CommandStatus.TIMED_OUT
    outcome = await store.get_outcome(silent)
    assert outcome is not None
    assert (outcome.status, outcome.reported_at) == (CommandStatus.TIMED_OUT, clock())
    assert await store.get_status(answered) == CommandStatus.SUCCEEDED
    assert await store.get_status(no_deadline) == CommandStatus.DELIVERED
    with pytest.raises(OutcomeRejected):
        await store.complete_command(silent)


async def test_a_bad_outcome_timeout_is_refused_before_anything_is_written(
    store: Store,
) -> None:
    for timeout in (0, -1, math.nan, math.inf, "30", timedelta(days=400), True):
        with pytest.raises(InvalidInput):
            await store.enqueue("dev-1", b"x", 60, outcome_timeout=timeout)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            await store.enqueue_or_update("dev-1", "t", b"x", 60, outcome_timeout=timeout)  # type: ignore[arg-type]
    assert await commands_held(store) == 0


async def test_outcomes_are_pruned_after_the_retention_and_a_deadline_is_awaited(
    open_store: OpenStore, clock: FakeClock
) -> None:
    async with open_store(retention=timedelta(hours=1)) as store:
        waiting = await delivered(store, b"waiting", outcome_timeout=timedelta(hours=2))
        reported = await delivered(store, b"reported")
        clock.advance(50 * 60)
        await store.fail_command(reported, "late")

        clock.advance(20 * 60)  # delivered 70 minutes ago, reported 20 minutes ago
        await store.cleanup()
        assert await store.get_status(reported) == CommandStatus.FAILED
        assert await store.get_status(waiting) == CommandStatus.DELIVERED

        clock.advance(51 * 60)  # the deadline passed: waiting ends TIMED_OUT only now
        await store.cleanup()
        with pytest.raises(CommandNotFound):
            await store.get_status(reported)
        assert await store.get_status(waiting) == CommandStatus.TIMED_OUT

        clock.advance(61 * 60)
        await store.cleanup()
        with pytest.raises(CommandNotFound):
            await store.get_status(waiting)
