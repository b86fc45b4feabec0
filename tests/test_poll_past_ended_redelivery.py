"""A ``consume()`` loop polled with short deadlines, its window holding the redelivered
message of a command that has ended.

Found by a helper's probe: a stream closed with commands unsettled requeues them, marked
redelivered; one of them cancelled meanwhile, the next stream asks the index to end the
claims on it (a dead drain's, maybe) before it drops it. That is a write; on PostgreSQL a
poll's deadline cut it half way, which spoils its connection, so the next poll opened a new
one and asked again, cut again: at 1 ms deadlines the next command was not handed out in
20 s (5 of 6 runs), with hundreds of "Future exception was never retrieved" logged. The end
of the claims, cut, now finishes by itself, and the next poll does not ask it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from amqp_queue import RabbitMQStore
from amqp_queue.claim_ends import CLOSE_WAIT
from tests.rabbitmq_support import rabbitmq_store
from tests.test_adversarial_seams import BACKENDS, state_url_for

POLL = 0.001
MAX_POLLS = 3_000


async def _ended_in_the_queue(store: RabbitMQStore) -> str:
    """Commands a, b, c to ``dev``; a stream takes a and closes, so b and c are back in the
    queue, redelivered; b ends. Returns c's id."""
    first = await store.enqueue("dev", b"a", 600)
    ended = await store.enqueue("dev", b"b", 600)
    last = await store.enqueue("dev", b"c", 600)
    async with store.consume("dev") as stream:
        assert (await anext(stream)).id == first
    await store.cancel_command(ended)
    return last


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_poll_past_an_ended_redelivered_command_gets_the_next(
    backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        state_url_for(backend, tmp_path) as state_url,
        rabbitmq_store(tmp_path, state_url=state_url) as store,
    ):
        opened: list[object] = []
        engine = getattr(store.state, "engine", None)
        if engine is not None:
            sa.event.listen(engine.sync_engine, "connect", lambda *_: opened.append(1))
        last = await _ended_in_the_queue(store)
        opened.clear()
        polls = 0
        got = None
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            async with store.consume("dev") as stream:
                while got is None and polls < MAX_POLLS:
                    polls += 1
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(POLL):
                            got = await anext(stream)
        assert got is not None, f"nothing handed out in {polls} polls"
        assert got.id == last
        assert [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()] == []
        assert len(opened) <= 5, f"{len(opened)} index connections opened in {polls} polls"


async def test_a_cut_polls_ask_does_not_outlive_its_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of claims a cut poll left running is waited for, boundedly, then cancelled
    when its stream closes: its store may close the index next (a review saw one run on a
    disposed engine after the store had closed). It is asked once however often the poll
    is cut."""
    async with rabbitmq_store(tmp_path) as store:
        await _ended_in_the_queue(store)
        asked: list[str] = []
        outcomes: list[str] = []

        async def end_claims(command_ids: Any) -> int:
            asked.append("asked")
            try:
                await asyncio.sleep(60)  # an index that does not answer
            except asyncio.CancelledError:
                outcomes.append("cancelled")
                raise
            return 0

        monkeypatch.setattr(store.state, "end_claims", end_claims)
        loop = asyncio.get_running_loop()
        async with store.consume("dev") as stream:
            for _ in range(20):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.01):
                        await anext(stream)
            began = loop.time()
        closing = loop.time() - began
        assert asked == ["asked"]
        assert outcomes == ["cancelled"]
        assert closing < CLOSE_WAIT + 1


async def test_a_stream_closed_by_another_task_ends_the_poll_waiting_on_an_ask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop waiting for its ask ends as any loop does when another task closes its stream:
    with the stream's end, not a ``CancelledError`` nobody asked for (a review saw the
    close's cancel of the ask reach the waiting poll)."""
    async with rabbitmq_store(tmp_path) as store:
        await _ended_in_the_queue(store)

        async def end_claims(command_ids: Any) -> int:
            await asyncio.sleep(3)  # a slow index: a lock waited for
            return 0

        monkeypatch.setattr(store.state, "end_claims", end_claims)
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            async with store.consume("dev") as stream:
                polling = asyncio.ensure_future(anext(stream))
                await asyncio.sleep(0.3)
            with pytest.raises(StopAsyncIteration):
                await polling
            # A poll cut while its ask runs, then the ask cancelled by the close: read.
            async with store.consume("dev") as stream:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.3):
                        await anext(stream)
            gc.collect()
        assert [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()] == []
