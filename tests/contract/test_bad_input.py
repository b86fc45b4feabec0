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


def _device_calls(device: Any) -> list[tuple[str, Call]]:
    return [
        (f"enqueue({device!r})", lambda s: s.enqueue(device, b"x", 60)),
        (f"enqueue_or_update({device!r})", lambda s: s.enqueue_or_update(device, "t", b"x", 60)),
        (
            f"enqueue_with_confirmation({device!r})",
            lambda s: s.enqueue_with_confirmation(device, "t", b"x", 60),
        ),
        (f"get_pending({device!r})", lambda s: s.get_pending(device)),
        (f"drain_pending({device!r})", lambda s: s.drain_pending(device)),
        (f"get_pending_confirmations({device!r})", lambda s: s.get_pending_confirmations(device)),
    ]


def _type_calls(kind: Any) -> list[tuple[str, Call]]:
    return [
        (
            f"enqueue_or_update(type={kind!r})",
            lambda s: s.enqueue_or_update("dev-1", kind, b"x", 60),
        ),
        (
            f"enqueue_with_confirmation(type={kind!r})",
            lambda s: s.enqueue_with_confirmation("dev-1", kind, b"x", 60),
        ),
    ]


def _payload_calls(payload: Any) -> list[tuple[str, Call]]:
    shown = repr(payload)[:40]
    return [
        (f"enqueue(payload={shown})", lambda s: s.enqueue("dev-1", payload, 60)),
        (
            f"enqueue_or_update(payload={shown})",
            lambda s: s.enqueue_or_update("dev-1", "t", payload, 60),
        ),
    ]


def _ttl_calls(ttl: Any) -> list[tuple[str, Call]]:
    return [
        (f"enqueue(ttl={ttl!r})", lambda s: s.enqueue("dev-1", b"x", ttl)),
        (
            f"enqueue_with_confirmation(ttl={ttl!r})",
            lambda s: s.enqueue_with_confirmation("dev-1", "t", b"x", ttl),
        ),
    ]


def _cases() -> dict[type[InvalidInput], list[tuple[str, Call]]]:
    """Each error with the calls that must raise it, each call named for the report."""
    return {
        InvalidDeviceId: [c for device in BAD_DEVICE_IDS for c in _device_calls(device)],
        InvalidCommandType: [
            c for kind in [*BAD_COMMAND_TYPES, None, 7] for c in _type_calls(kind)
        ],
        InvalidPayload: [c for payload in BAD_PAYLOADS for c in _payload_calls(payload)],
        InvalidTTL: [c for ttl in BAD_TTLS for c in _ttl_calls(ttl)],
    }


CASES = _cases()


# One store per backend and error: every call of the error's cases on it, each checked for
# its error and for nothing written (a call that wrote would fail the check of every call
# after it too; the report names the first). A store of its own per call made this file a
# fifth of the suite's slowest worker.
@pytest.mark.parametrize("error", list(CASES), ids=lambda error: error.__name__)
async def test_bad_input_raises_and_writes_nothing(store: Store, error: type[InvalidInput]) -> None:
    wrong: list[str] = []
    for name, call in CASES[error]:
        try:
            await call(store)
        except error as raised:
            if not (isinstance(raised, ValueError) and isinstance(raised, QueueError)):
                wrong.append(f"{name}: {raised!r} is not a ValueError and QueueError")
            elif not str(raised):
                wrong.append(f"{name}: raised with no message")
        except Exception as other:  # reported below with the others, not swallowed
            wrong.append(f"{name}: raised {other!r}, not {error.__name__}")
        else:
            wrong.append(f"{name}: did not raise {error.__name__}")
        if await commands_held(store) != 0:
            wrong.append(f"{name}: wrote a command")
            break
    assert not wrong, "\n".join(wrong)
    assert len(CASES[error]) >= 10


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
