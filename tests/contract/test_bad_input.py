"""Rule 7: bad input gets a clear exception before anything is written."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from amqp_queue.state import (
    InvalidCommandType,
    InvalidDeviceId,
    InvalidInput,
    InvalidPayload,
    InvalidTTL,
    QueueError,
    Store,
)
from tests.backends import commands_held

Call = Callable[[Store], Awaitable[Any]]

BAD_DEVICE_IDS = [
    "",
    "x" * 129,
    "dév",
    "dev 1",
    "dev/1",
    "../etc",
    "a..b",
    "dev'1;--",
    "\x00",
    "amq.x",
]
BAD_COMMAND_TYPES = ["", "t" * 129, "type with space", "ünï", "a'b", "\n"]
BAD_PAYLOADS: list[object] = ["text", None, 42, [1, 2], b"x" * (256 * 1024 + 1)]
BAD_TTLS: list[object] = [
    0,
    -1,
    math.nan,
    math.inf,
    -math.inf,
    timedelta(0),
    "60",
    None,
    True,
    timedelta(days=31),
]


def _cases() -> list[Any]:
    cases: list[Any] = []
    for device in BAD_DEVICE_IDS:
        cases += [
            pytest.param(InvalidDeviceId, lambda s, d=device: s.enqueue(d, b"x", 60)),
            pytest.param(
                InvalidDeviceId, lambda s, d=device: s.enqueue_or_update(d, "t", b"x", 60)
            ),
            pytest.param(
                InvalidDeviceId,
                lambda s, d=device: s.enqueue_with_confirmation(d, "t", b"x", 60),
            ),
            pytest.param(InvalidDeviceId, lambda s, d=device: s.get_pending(d)),
            pytest.param(InvalidDeviceId, lambda s, d=device: s.drain_pending(d)),
            pytest.param(InvalidDeviceId, lambda s, d=device: s.get_pending_confirmations(d)),
        ]
    for kind in [*BAD_COMMAND_TYPES, None, 7]:
        cases += [
            pytest.param(
                InvalidCommandType, lambda s, k=kind: s.enqueue_or_update("dev-1", k, b"x", 60)
            ),
            pytest.param(
                InvalidCommandType,
                lambda s, k=kind: s.enqueue_with_confirmation("dev-1", k, b"x", 60),
            ),
        ]
    for payload in BAD_PAYLOADS:
        cases += [
            pytest.param(InvalidPayload, lambda s, p=payload: s.enqueue("dev-1", p, 60)),
            pytest.param(
                InvalidPayload, lambda s, p=payload: s.enqueue_or_update("dev-1", "t", p, 60)
            ),
        ]
    for ttl in BAD_TTLS:
        cases += [
            pytest.param(InvalidTTL, lambda s, t=ttl: s.enqueue("dev-1", b"x", t)),
            pytest.param(
                InvalidTTL, lambda s, t=ttl: s.enqueue_with_confirmation("dev-1", "t", b"x", t)
            ),
        ]
    return cases


@pytest.mark.parametrize(("error", "call"), _cases())
async def test_bad_input_raises_and_writes_nothing(
    store: Store, error: type[InvalidInput], call: Call
) -> None:
    with pytest.raises(error) as raised:
        await call(store)

    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, QueueError)
    assert str(raised.value)
    assert await commands_held(store) == 0


async def test_bad_replacement_leaves_the_live_command_alone(store: Store) -> None:
    live = await store.enqueue_or_update("dev-1", "setpoint", b"20", 60)

    with pytest.raises(InvalidPayload):
        await store.enqueue_or_update("dev-1", "setpoint", "not bytes", 60)  # type: ignore[arg-type]

    assert [c.id for c in await store.get_pending("dev-1")] == [live]
    assert await commands_held(store) == 1


async def test_bytes_like_payloads_are_accepted_as_bytes(store: Store) -> None:
    await store.enqueue("dev-1", bytearray(b"ab"), 60)  # type: ignore[arg-type]
    await store.enqueue("dev-1", memoryview(b"cd"), 60)  # type: ignore[arg-type]
    await store.enqueue("dev-1", b"", 60)

    assert await store.drain_pending("dev-1") == [b"ab", b"cd", b""]
