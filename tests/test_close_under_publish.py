"""``close()`` while enqueues' direct publishes are on the wire.

Closing the store closes its publishing channel, and the channel's close cancels the
publishes waiting on it. An enqueue whose caller was not cancelled must not see that
cancellation: its command is durable in the index, so the call either returns it (owed to
whichever relay runs next) or fails with the library's own error, and the command reaches its
device either way once another store runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from pathlib import Path

import pytest

from amqp_queue import QueueError
from tests.support import matrix, seeded
from tests.test_adversarial_ninth import LONG, space_on, take
from tests.test_adversarial_seams import BACKENDS

pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deadline", matrix([0.0, 0.02, 0.05, 0.1], [0.02]))
async def test_an_enqueue_is_never_cancelled_by_close(
    backend: str, deadline: float, tmp_path: Path
) -> None:
    """Enqueues run in a steady flood while ``close()`` runs under a caller's deadline (it
    waits for a loop body meanwhile, so the deadline cuts it short and it closes the
    connection under the publishes on the wire), then is called again."""
    rng = seeded()
    async with space_on(backend, tmp_path) as space:
        a = await space.open(relay_after=1.0)
        busy, devices = space.device(), [space.device() for _ in range(4)]
        for device in [busy, *devices]:
            await a.ensure_queue(device)
        wanted: list[tuple[str, bytes]] = []
        calls: list[asyncio.Future[str]] = []
        await a.enqueue(busy, b"hold", LONG)
        in_body = asyncio.Event()

        async def body() -> None:
            async with a.consume(busy) as commands:
                async for _ in commands:
                    in_body.set()
                    await asyncio.sleep(5)

        reader = asyncio.create_task(body())
        await in_body.wait()
        while len(calls) < 400:
            for device in devices:
                wanted.append((device, f"{device}/{len(wanted)}".encode()))
                calls.append(asyncio.ensure_future(a.enqueue(*wanted[-1], LONG)))
            await asyncio.sleep(rng.uniform(0, 0.001))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline):
                await a.close()
        await asyncio.wait_for(a.close(), 30)
        await asyncio.wait_for(asyncio.gather(reader, return_exceptions=True), 10)
        answers = await asyncio.gather(*calls, return_exceptions=True)
        cancelled = [a for a in answers if isinstance(a, asyncio.CancelledError)]
        assert not cancelled, f"{len(cancelled)} enqueues saw close() as a cancellation"
        foreign = [a for a in answers if isinstance(a, BaseException)]
        foreign = [a for a in foreign if not isinstance(a, QueueError)]
        assert not foreign, ["".join(traceback.format_exception(f)) for f in foreign[:1]]
        accepted = {
            answer: sent
            for answer, sent in zip(answers, wanted, strict=True)
            if isinstance(answer, str)
        }

        c = await space.open(relay_after=1.0)
        got: list[tuple[str, bytes]] = []
        for device in devices:
            want = {p for d, p in accepted.values() if d == device}
            if want:
                got += await take(c, device, want, 15)
        missing = set(accepted) - {i for i, _ in got}
        assert not missing, f"{len(missing)} accepted commands never came"
