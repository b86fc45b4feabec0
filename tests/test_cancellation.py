"""``run_through`` and ``cancellation_kept`` (``amqp_queue.state.cancellation``) on their own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import pytest

from amqp_queue.state.cancellation import cancellation_kept, run_through


async def test_an_uncancelled_call_answers_or_raises_as_itself() -> None:
    async def answer() -> int:
        return 7

    async def fail() -> int:
        raise ValueError("no")

    assert await run_through(answer()) == 7
    with pytest.raises(ValueError, match="no"):
        await run_through(fail())


async def test_a_cancelled_caller_waits_for_the_call_then_undoes_its_answer() -> None:
    finished = asyncio.Event()
    undone: list[int] = []

    async def call() -> int:
        await asyncio.sleep(0.05)
        finished.set()
        return 3

    async def undo(answer: int) -> None:
        undone.append(answer)

    task = asyncio.create_task(run_through(call(), undo))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Raised only once the call ended and its answer went back.
    assert finished.is_set()
    assert undone == [3]


async def test_nothing_is_left_running_behind_a_cancelled_caller() -> None:
    release = asyncio.Event()
    order: list[str] = []

    async def call() -> str:
        await release.wait()
        order.append("call ended")
        return "taken"

    async def undo(answer: str) -> None:
        order.append(f"{answer} given back")

    task = asyncio.create_task(run_through(call(), undo))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.2)
    assert not task.done()  # a later call of its caller cannot overtake it
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert order == ["call ended", "taken given back"]


async def test_a_failed_undo_is_chained_to_the_cancellation() -> None:
    async def call() -> int:
        await asyncio.sleep(0.02)
        return 1

    async def undo(answer: int) -> None:
        raise RuntimeError("index away")

    assert isinstance(await _cause_of_cancelled(run_through(call(), undo), 0.005), RuntimeError)


async def test_a_second_cancellation_does_not_cut_the_wait_short() -> None:
    undone: list[int] = []

    async def call() -> int:
        await asyncio.sleep(0.05)
        return 1

    async def undo(answer: int) -> None:
        await asyncio.sleep(0.02)
        undone.append(answer)

    task = asyncio.create_task(run_through(call(), undo))
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert undone == [1]


async def test_a_cancellation_dropped_inside_the_block_is_raised_when_it_ends() -> None:
    dropped = asyncio.Event()

    async def drops_one() -> None:
        # What Python 3.11's wait_for does when the inner call finishes as it is cancelled.
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            dropped.set()

    async def caller() -> str:
        with cancellation_kept():
            await drops_one()
        return "went on"

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert dropped.is_set()


async def test_a_failure_after_a_dropped_cancellation_is_raised_as_the_cancellation() -> None:
    async def drops_one_then_fails() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # as wait_for does on 3.11
            await asyncio.sleep(10)
        raise ConnectionError("redis went away")

    async def caller() -> None:
        with cancellation_kept():
            await drops_one_then_fails()

    assert isinstance(await _cause_of_cancelled(caller(), 0.01), ConnectionError)


async def test_a_cancellation_handled_inside_the_block_is_not_raised_again() -> None:
    async def caller() -> str:
        with cancellation_kept():
            try:
                async with asyncio.timeout(0.01):  # cancels the task, then takes it back
                    await asyncio.sleep(10)
            except TimeoutError:
                pass
        return "went on"

    assert await caller() == "went on"


async def _cause_of_cancelled(work: Coroutine[Any, Any, Any], after: float) -> object:
    """Runs ``work`` in a task, cancels it ``after`` seconds, and returns the cause chained to
    the ``CancelledError`` it ends with."""
    task = asyncio.create_task(work)
    await asyncio.sleep(after)
    task.cancel()
    with pytest.raises(asyncio.CancelledError) as raised:
        await task
    return raised.value.__cause__
