"""Review of MarkCommits (shared delivery-mark commits): a commit carries up to 64 streams'
batches, each up to a prefetch window (1,000 by default) of ids, in ONE statement whose ids
are bound one parameter each. PostgreSQL takes 32,767 parameters at most: 33 streams with a
full window each make a statement the server (driver) refuses, every one of those streams'
marks fails, and since each stream keeps its unmarked ids for its next batch the retry is as
large and fails again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Collection
from pathlib import Path

import pytest

from amqp_queue import CommandStatus
from tests.support import matrix
from tests.test_adversarial_ninth import LONG, space_on

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

STREAMS, WINDOW = 40, 1000  # 40 streams, each a default prefetch window of finished ids


@pytest.mark.timeout(120)
async def test_forty_full_windows_marked_together_on_postgres(tmp_path: Path) -> None:
    async with space_on("postgres", tmp_path) as space:
        store = await space.open()
        device = space.device()
        real = await store.enqueue(device, b"c", LONG)
        batches = [[str(uuid.uuid4()) for _ in range(WINDOW)] for _ in range(STREAMS)]
        batches[0][0] = real
        marks = store._marks  # what each stream's DeliveryMarks calls (store.py consume())
        outcomes = await asyncio.gather(
            *(marks.mark_delivered(batch) for batch in batches), return_exceptions=True
        )
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert not failed, f"{len(failed)} of {STREAMS} streams' marks failed: {failed[0]!r}"
        assert await store.get_status(real) == CommandStatus.DELIVERED


DEVICES = 48


@pytest.mark.timeout(300)
@pytest.mark.parametrize("each", matrix([1000], [60]))  # 48 full windows: over the bind limit
async def test_full_windows_marked_after_an_index_pause_on_postgres(each: int) -> None:
    """48 devices with 1,000 commands each, consumed through one store (default prefetch of
    1,000, ``recheck_after`` set so a window is asked about once). Each stream is handed its
    first command, then the store's index link stalls for 5 s while the streams go through
    their windows: every stream's marks wait. Once the link is back they should all land."""
    from tests.test_adversarial_fifteenth import indexed_space

    async with indexed_space("postgres", bound=30.0) as ix:
        sp = ix.space
        writer = await sp.open()
        store = await sp.open(state_url=ix.proxied, recheck_after=60.0, publish_timeout=20.0)
        devices = [sp.device() for _ in range(DEVICES)]
        for device in devices:
            await writer.ensure_queue(device)
        for device in devices:
            await asyncio.gather(*(writer.enqueue(device, b"c", LONG) for _ in range(each)))
        failures: list[BaseException] = []
        sizes: list[int] = []
        mark_delivered = store.state.mark_delivered

        async def watched(command_ids: Collection[str]) -> int:
            sizes.append(len(command_ids))
            try:
                return await mark_delivered(command_ids)
            except BaseException as exc:
                failures.append(exc)
                raise

        store.state.mark_delivered = watched  # type: ignore[method-assign]
        first = asyncio.Barrier(DEVICES + 1)
        done = asyncio.Barrier(DEVICES + 1)

        async def read(device: str) -> int:
            got = 0
            async with store.consume(device) as commands:
                # The broker fills the prefetch window meanwhile.
                await asyncio.sleep(8.0 if each >= 1000 else 1.0)
                async for _ in commands:
                    got += 1
                    if got == 1:
                        await first.wait()
                    if got == each:
                        break
            await done.wait()
            return got

        readers = [asyncio.create_task(read(d)) for d in devices]
        await first.wait()
        ix.index.stall()
        await asyncio.sleep(5.0)
        ix.index.resume()
        await done.wait()
        await asyncio.gather(*readers)
        print(f"{len(sizes)} mark commits, largest {max(sizes)} ids")
        why = [str(f)[:100] for f in failures]
        assert not failures, f"{len(failures)} mark commits failed: {why[:2]}"
