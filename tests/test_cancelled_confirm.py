"""A ``confirm_command`` cut short by its caller on a command that is no longer open.

Found by a helper's public-API probe: the confirmation's write went on in the background,
raised ``CommandNotFound`` there, and nobody read it: asyncio logged "Task exception was
never retrieved" (an ERROR) for a call whose caller had already seen its cancellation (1 to
4 times in 60 cut confirms).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import warnings
from pathlib import Path

import pytest

from amqp_queue import CommandNotFound
from tests.rabbitmq_support import rabbitmq_store


async def test_a_cut_confirm_leaves_no_unread_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cut = 0
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        async with rabbitmq_store(tmp_path) as store:
            for n in range(60):
                command_id = await store.enqueue_with_confirmation("dev", "door", b"x", 600)
                await store.cancel_command(command_id)
                try:
                    async with asyncio.timeout((n % 20) * 0.0005):
                        await store.confirm_command(command_id)
                except TimeoutError:
                    cut += 1
                except CommandNotFound:
                    pass
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
            gc.collect()
    assert cut
    assert "never retrieved" not in caplog.text


async def test_a_cut_fan_out_leaves_no_declaration_unawaited(tmp_path: Path) -> None:
    """A fan-out cut while its queue declarations waited for their turn left those
    coroutines never awaited (a RuntimeWarning at collection, helper probe)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with rabbitmq_store(tmp_path) as store:
            # Over FAN_OUT_IN_FLIGHT (1,000) declarations: the rest wait for the gate.
            devices = [f"fan-{d}" for d in range(1_050)]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await store.enqueue_many(devices, b"x", 600)
            gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
