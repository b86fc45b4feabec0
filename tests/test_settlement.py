"""Settlement of drained and consumed messages: a message is acked only when its command was
claimed (or marked delivered) by this call, or is provably finished.

A live command's message that the call did not claim (its row locked by another
transaction, an index error) goes back to the queue; what a call claimed but could not hand
over goes back too, never to DELIVERED. Each test here once lost a command: its message was
acked (often by a later ``multiple`` ack) while its command stayed PENDING in the index,
with nothing left in the queue to deliver it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from amqp_queue import CommandStatus, RabbitMQStore
from amqp_queue import drain as drain_module
from amqp_queue.state import CommandNotFound, CommandRecord, MemoryStore, SqlStore, StateError
from amqp_queue.state.errors import ClaimOutcomeUnknown
from amqp_queue.state.indexed_store import IndexedStore
from amqp_queue.state.sql import command_queue
from tests.backends import POSTGRES_URL
from tests.rabbitmq_support import queue_depth
from tests.shared_index import drain_until, shared_index

DEVICE = "dev-1"


@asynccontextmanager
async def row_locked(schema: str, command_id: str) -> AsyncIterator[None]:
    """Holds a command's row locked (``SELECT ... FOR UPDATE``) from a connection of its
    own, as a concurrent confirm, cancel or publish mark does, until the block ends."""
    engine = create_async_engine(POSTGRES_URL).execution_options(
        schema_translate_map={None: schema}
    )
    try:
        async with engine.connect() as conn, conn.begin():
            row = (
                await conn.execute(
                    sa.select(command_queue.c.seq)
                    .where(command_queue.c.id == command_id)
                    .with_for_update()
                )
            ).first()
            assert row is not None, "the command's row is not in the index"
            yield
    finally:
        await engine.dispose()


async def _statuses(store: RabbitMQStore, ids: list[str]) -> list[CommandStatus]:
    return [await store.get_status(command_id) for command_id in ids]


async def test_a_drain_leaves_queued_a_command_whose_row_another_transaction_locks(
    tmp_path: Path,
) -> None:
    async with (
        shared_index("postgres", tmp_path) as shared,
        shared.store(await shared.open_index()) as store,
    ):
        command_id = await store.enqueue(DEVICE, b"cmd", 600)
        locked = asyncio.Event()
        drain_over = asyncio.Event()

        async def hold_the_row() -> None:
            async with row_locked(shared.schema, command_id):
                locked.set()
                # Until the drain is over; a second at most, should it wait for the row.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(drain_over.wait(), 1.0)

        holder = asyncio.create_task(hold_the_row())
        await asyncio.wait_for(locked.wait(), 5)
        try:
            # The claim skips the locked row; its message must not be acked.
            drained = await asyncio.wait_for(store.drain_pending(DEVICE), 5)
        finally:
            drain_over.set()
            await holder
        drained += await drain_until(store, DEVICE, count=1 - len(drained), seconds=2)

        assert drained == [b"cmd"], (
            f"status {await store.get_status(command_id)}, "
            f"{await queue_depth(store, DEVICE)} messages queued"
        )
        assert await store.get_status(command_id) is CommandStatus.DELIVERED
        assert await queue_depth(store, DEVICE) == 0


async def test_a_drain_right_after_each_enqueue_loses_nothing(tmp_path: Path) -> None:
    # The enqueue's publish mark commits in the background and locks the row meanwhile:
    # a drain at once races it (the reported symptom, without any injected lock).
    rounds = 100
    async with (
        shared_index("postgres", tmp_path) as shared,
        shared.store(await shared.open_index()) as store,
    ):
        ids: list[str] = []
        drained: list[bytes] = []
        done = asyncio.Event()

        async def other_traffic() -> None:
            # Other devices' commands share the index transactions of the publish marks.
            while not done.is_set():
                await asyncio.gather(*(store.enqueue(f"other-{n}", b"x", 600) for n in range(10)))

        traffic = asyncio.create_task(other_traffic())
        try:
            for n in range(rounds):
                ids.append(await store.enqueue(DEVICE, f"c{n}".encode(), 600))
                drained += await store.drain_pending(DEVICE)
        finally:
            done.set()
            await traffic
        drained += await drain_until(store, DEVICE, count=rounds - len(drained), seconds=2)

        assert drained == [f"c{n}".encode() for n in range(rounds)], (
            Counter(await _statuses(store, ids)),
            await queue_depth(store, DEVICE),
        )
        assert await _statuses(store, ids) == [CommandStatus.DELIVERED] * rounds


async def test_a_drain_while_confirmations_are_repeated_loses_nothing(
    tmp_path: Path,
) -> None:
    # Confirming a confirmed command again is harmless (rule 4), but it locks the row for a
    # moment; operators (or retrying clients) doing so must not cost the device a command.
    rounds = 30
    async with (
        shared_index("postgres", tmp_path) as shared,
        shared.store(await shared.open_index()) as store,
    ):
        ids: list[str] = []
        live: set[str] = set()
        done = asyncio.Event()

        async def confirm_again() -> None:
            while not done.is_set():
                for command_id in list(live):
                    try:
                        await store.confirm_command(command_id)
                    except CommandNotFound:
                        live.discard(command_id)  # delivered meanwhile
                await asyncio.sleep(0)

        confirmers = [asyncio.create_task(confirm_again()) for _ in range(4)]
        drained: list[bytes] = []
        try:
            for n in range(rounds):
                command_id = await store.enqueue_with_confirmation(
                    DEVICE, f"t{n}", f"c{n}".encode(), 600
                )
                ids.append(command_id)
                await store.confirm_command(command_id)
                live.add(command_id)
                drained += await store.drain_pending(DEVICE)
        finally:
            done.set()
            await asyncio.gather(*confirmers)
        drained += await drain_until(store, DEVICE, count=rounds - len(drained), seconds=2)

        assert sorted(drained) == sorted(f"c{n}".encode() for n in range(rounds)), (
            Counter(await _statuses(store, ids)),
            await queue_depth(store, DEVICE),
        )
        assert await _statuses(store, ids) == [CommandStatus.DELIVERED] * rounds


async def test_one_store_enqueues_while_another_drains_every_command_once_in_order(
    tmp_path: Path,
) -> None:
    count = 100
    async with (
        shared_index("postgres", tmp_path) as shared,
        shared.store(await shared.open_index()) as producer,
        shared.store(await shared.open_index()) as gateway,
    ):
        await gateway.ensure_queue(DEVICE)
        ids: list[str] = []
        drained: list[bytes] = []

        async def produce() -> None:
            for n in range(count):
                ids.append(await producer.enqueue(DEVICE, f"c{n:03}".encode(), 600))

        producing = asyncio.create_task(produce())
        while not producing.done():
            drained += await gateway.drain_pending(DEVICE)
        await producing
        drained += await drain_until(gateway, DEVICE, count=count - len(drained), seconds=2)

        assert max(Counter(drained).values(), default=0) <= 1, "a command was drained twice"
        assert drained == [f"c{n:03}".encode() for n in range(count)], (
            f"{count - len(drained)} lost: {Counter(await _statuses(gateway, ids))}, "
            f"{await queue_depth(gateway, DEVICE)} messages queued"
        )


class AdmissionFails(SqlStore):
    """An index whose next ``failures`` reads of a window's live commands fail."""

    failures = 0

    async def deliverable(self, command_ids: Collection[str]) -> dict[str, CommandRecord]:
        if self.failures:
            self.failures -= 1
            raise StateError("state index read failed: injected")
        return await super().deliverable(command_ids)


async def test_a_stream_that_goes_on_after_an_index_error_loses_none_of_that_window(
    tmp_path: Path,
) -> None:
    async with shared_index("sqlite", tmp_path) as shared:
        state = await shared.open_index(AdmissionFails)
        assert isinstance(state, AdmissionFails)
        async with shared.store(state) as store:
            ids = [await store.enqueue(DEVICE, f"c{n}".encode(), 600) for n in range(3)]
            state.failures = 1
            handed_out: list[str] = []
            async with store.consume(DEVICE) as stream:
                try:
                    await asyncio.wait_for(anext(stream), 5)
                except StateError:
                    pass  # a caller may well go on with the same stream
                else:
                    raise AssertionError("the injected index failure did not happen")
                ids.append(await store.enqueue(DEVICE, b"c3", 600))
                try:
                    async with asyncio.timeout(3):
                        while len(handed_out) < len(ids):
                            handed_out.append((await anext(stream)).id)
                except TimeoutError:
                    pass  # what did not come is looked for below
            # Whatever the stream did not hand out must still be queued for a drain.
            drained = await store.drain_commands(DEVICE)
            got = handed_out + [record.id for record in drained]

            assert Counter(got) == Counter(ids), (
                f"handed out {len(handed_out)}, drained {len(drained)} of {len(ids)}: "
                f"{await _statuses(store, ids)}"
            )
            assert await _statuses(store, ids) == [CommandStatus.DELIVERED] * len(ids)
            assert await queue_depth(store, DEVICE) == 0


class SecondClaimFails(SqlStore):
    """An index whose claims fail from the ``fail_from``-th on, until ``fail_from`` is
    cleared."""

    fail_from: int | None = None
    claims = 0

    async def claim(
        self, device_id: str, command_ids: Collection[str] | None = None
    ) -> list[CommandRecord]:
        self.claims += 1
        if self.fail_from is not None and self.claims >= self.fail_from:
            raise StateError("state index write failed: injected")
        return await super().claim(device_id, command_ids)


async def test_a_drain_whose_index_fails_on_a_later_claim_loses_no_claimed_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deep queue is claimed in several statements; the index fails on the second."""
    monkeypatch.setattr(drain_module, "CLAIM_MOST", 5)
    count = 20
    payloads = [f"c{n:02}".encode() for n in range(count)]
    async with shared_index("sqlite", tmp_path, prefetch=5) as shared:
        state = await shared.open_index(SecondClaimFails)
        assert isinstance(state, SecondClaimFails)
        async with shared.store(state) as store:
            ids = [await store.enqueue(DEVICE, payload, 600) for payload in payloads]
            state.fail_from = 2
            first: list[bytes] = []
            # A StateError is allowed: then nothing may have been taken from the queue.
            with contextlib.suppress(StateError):
                first = await asyncio.wait_for(store.drain_pending(DEVICE), 5)
            assert state.claims >= 2, "the drain never reached its second claim"
            not_returned = [cid for cid, p in zip(ids, payloads, strict=True) if p not in first]
            statuses = await _statuses(store, not_returned)
            assert CommandStatus.DELIVERED not in statuses, (
                f"{statuses.count(CommandStatus.DELIVERED)} commands marked delivered "
                "were never returned to the caller"
            )

            state.fail_from = None  # the index is back
            rest = await drain_until(store, DEVICE, count=count - len(first), seconds=2)

            assert first + rest == payloads
            assert await _statuses(store, ids) == [CommandStatus.DELIVERED] * count
            assert await queue_depth(store, DEVICE) == 0


class _UnheardClaims(IndexedStore):
    """An index whose next claim fails saying its outcome is unknown, after claiming
    (``landed``) or not."""

    landed: bool | None = None
    """None: claims work; else the next one fails so, then claims work again."""

    async def claim(
        self, device_id: str, command_ids: Collection[str] | None = None
    ) -> list[CommandRecord]:
        landed, self.landed = self.landed, None
        if landed is None:
            return await super().claim(device_id, command_ids)
        if landed:
            records = await super().claim(device_id, command_ids)
        elif command_ids is None:  # what the claim of a whole device would have taken
            records = [r for r in await self.open_commands(device_id) if r.is_ready]
        else:
            records = list((await self.deliverable(command_ids)).values())
        raise ClaimOutcomeUnknown("state index write failed: injected; outcome unknown", records)


class ClaimUnheard(_UnheardClaims, SqlStore):
    """:class:`_UnheardClaims` on SQL."""


class MemoryClaimUnheard(_UnheardClaims, MemoryStore):
    """:class:`_UnheardClaims` in memory, which drains the index alone in two steps (SQL
    claims and hands over in one transaction there, whose doubt tests/test_sql_claim_doubt.py
    covers)."""


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "not landed"])
async def test_a_drain_hands_out_what_a_claim_of_unknown_outcome_did_claim(
    tmp_path: Path, landed: bool
) -> None:
    # Raised as "not claimed", a claim that landed made the next drain drop its commands
    # (delivered): delivered to nobody. Handed over, what the claim did take is handed out
    # and the rest left to the next drain, their messages queued: no loss and no copy.
    payloads = [f"c{n:02}".encode() for n in range(5)]
    async with shared_index("sqlite", tmp_path) as shared:
        state = await shared.open_index(ClaimUnheard)
        assert isinstance(state, ClaimUnheard)
        async with shared.store(state) as store:
            ids = [await store.enqueue(DEVICE, payload, 600) for payload in payloads]
            state.landed = landed
            if landed:
                first = await asyncio.wait_for(store.drain_pending(DEVICE), 5)
            else:
                # The claim took nothing: the drain hands nothing over, and says so.
                with pytest.raises(ClaimOutcomeUnknown):
                    await asyncio.wait_for(store.drain_pending(DEVICE), 5)
                first = []
            # The first window's messages stay queued: dropped if the claim landed (its
            # commands are delivered), else handed out by the next drain.
            rest = await drain_until(store, DEVICE, count=len(payloads) - len(first), seconds=2)
            rest += await store.drain_pending(DEVICE)

            if landed:
                assert first, "the drain handed out nothing"
            assert Counter(first + rest) == Counter(payloads)
            assert await _statuses(store, ids) == [CommandStatus.DELIVERED] * len(ids)
            assert await queue_depth(store, DEVICE) == 0


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "not landed"])
async def test_an_index_drain_returns_what_a_claim_of_unknown_outcome_did_claim(
    tmp_path: Path, landed: bool
) -> None:
    # The index alone (no broker): a claim that landed but raised lost its commands.
    async with MemoryClaimUnheard() as state:
        await state.enqueue(DEVICE, b"a", 600)
        await state.enqueue(DEVICE, b"b", 600)
        state.landed = landed

        first = await state.drain_pending(DEVICE)
        again = await state.drain_pending(DEVICE)

        assert (first, again) == (([b"a", b"b"], []) if landed else ([], [b"a", b"b"]))
