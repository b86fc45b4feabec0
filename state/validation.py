"""Input validation, written once and used by every backend (docs/design.md rule 7)."""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeGuard

from .errors import InvalidCommandType, InvalidDeviceId, InvalidInput, InvalidPayload, InvalidTTL

# A device id becomes part of a queue name (``<exchange>.<device_id>``) and of the regexes
# operators write for queue permissions, so it is kept to a plain ASCII alphabet.
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]*")
_COMMAND_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*")
RESERVED_PREFIX = "amq."
"""AMQP reserves queue names starting with it (any case): no device id may."""

DEVICE_ID_PATTERN = r"^(?![Aa][Mm][Qq]\.)(?!.*\.\.)" + _DEVICE_ID.pattern + "$"
"""What :func:`validate_device_id` accepts within its length limit, as a regular expression
in the subset ECMA-262 (JSON Schema, OpenAPI) and Python share."""

COMMAND_TYPE_PATTERN = "^" + _COMMAND_TYPE.pattern + "$"
"""What :func:`validate_command_type` accepts within its length limit (see above)."""

Ttl = float | int | timedelta
"""A time to live: seconds, or a ``timedelta``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds on what a store accepts.

    ``max_device_id_length`` leaves room for the exchange prefix within AMQP's 255-byte
    queue-name limit.

    ``max_pending_per_device`` caps a device's open commands (awaiting confirmation or
    pending; DESIGN.md rule 11): an enqueue past it raises ``QueueFull`` and writes nothing.
    The default, 1000, is far above what a device works through between two connections
    (Azure IoT Hub caps a device at 50 cloud-to-device messages), yet keeps one runaway
    producer from growing a device's queue, its index rows and its drain without bound: a
    drain of 1000 commands is still one bounded round trip. Raise it for devices that
    legitimately batch more.

    ``max_reason_length`` bounds the reason a gateway gives with ``fail_command``; an
    outcome's result is bounded by ``max_payload_bytes`` like a payload.
    """

    max_device_id_length: int = 128
    max_command_type_length: int = 128
    max_payload_bytes: int = 256 * 1024
    max_ttl: timedelta = timedelta(days=30)
    max_pending_per_device: int = 1000
    max_reason_length: int = 1024

    def __post_init__(self) -> None:
        if self.max_pending_per_device < 1:
            raise ValueError("max_pending_per_device must be at least 1")


DEFAULT_LIMITS = Limits()


def _days(seconds: float) -> str:
    """A duration for a message: '30 days', '1.5 hours'."""
    for unit, size in (("days", 86_400), ("hours", 3_600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} seconds"


def validate_device_id(device_id: object, limits: Limits = DEFAULT_LIMITS) -> str:
    if not isinstance(device_id, str):
        raise InvalidDeviceId(f"device id must be a str, not {type(device_id).__name__}")
    if not device_id:
        raise InvalidDeviceId("device id must not be empty")
    if len(device_id) > limits.max_device_id_length:
        raise InvalidDeviceId(
            f"device id is {len(device_id)} characters, over the limit of "
            f"{limits.max_device_id_length}"
        )
    if not _DEVICE_ID.fullmatch(device_id) or ".." in device_id:
        raise InvalidDeviceId(
            f"device id {device_id!r} may only hold ASCII letters, digits and _ . : @ -, "
            "must start with a letter or digit and must not contain '..'"
        )
    if device_id.lower().startswith(RESERVED_PREFIX):
        raise InvalidDeviceId(
            f"device id {device_id!r} uses the AMQP-reserved prefix {RESERVED_PREFIX!r}"
        )
    return device_id


def validate_command_type(command_type: object, limits: Limits = DEFAULT_LIMITS) -> str:
    if not isinstance(command_type, str):
        raise InvalidCommandType(f"command type must be a str, not {type(command_type).__name__}")
    if not command_type:
        raise InvalidCommandType("command type must not be empty")
    if len(command_type) > limits.max_command_type_length:
        raise InvalidCommandType(
            f"command type is {len(command_type)} characters, over the limit of "
            f"{limits.max_command_type_length}"
        )
    if not _COMMAND_TYPE.fullmatch(command_type):
        raise InvalidCommandType(
            f"command type {command_type!r} may only hold ASCII letters, digits and _ . : / -"
        )
    return command_type


def validate_payload(payload: object, limits: Limits = DEFAULT_LIMITS) -> bytes:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise InvalidPayload(f"payload must be bytes-like, not {type(payload).__name__}")
    data = bytes(payload)
    if len(data) > limits.max_payload_bytes:
        raise InvalidPayload(
            f"payload is {len(data)} bytes, over the limit of {limits.max_payload_bytes}"
        )
    return data


def validate_ttl(ttl: object, limits: Limits = DEFAULT_LIMITS) -> timedelta:
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, int | float) and not isinstance(ttl, bool):
        try:
            seconds = float(ttl)
        except OverflowError:
            # Not formatted into the message: str() of a very large int raises ValueError.
            raise InvalidTTL(
                f"ttl is an integer beyond any float, outside (0, {limits.max_ttl}]"
            ) from None
    else:
        raise InvalidTTL(f"ttl must be seconds or a timedelta, not {type(ttl).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidTTL(f"ttl must be positive and finite, got {ttl!r}")
    if seconds > limits.max_ttl.total_seconds():
        most = limits.max_ttl.total_seconds()
        raise InvalidTTL(
            f"ttl of {seconds:,.0f} s is over the maximum of {most:,.0f} s ({_days(most)})"
        )
    lifetime = timedelta(seconds=seconds)
    if not lifetime:
        # It rounds to nothing: the command would be expired as it is written.
        raise InvalidTTL(f"ttl of {seconds:g}s is under the resolution of one microsecond")
    return lifetime


def validate_outcome_timeout(timeout: object, limits: Limits = DEFAULT_LIMITS) -> float | None:
    """An outcome deadline (seconds after delivery) as seconds, or None for no deadline.

    Raises:
        InvalidInput: not seconds or a timedelta, not positive and finite, or over
            ``limits.max_ttl``.
    """
    if timeout is None:
        return None
    try:
        return validate_ttl(timeout, limits).total_seconds()
    except InvalidTTL as exc:
        raise InvalidInput(f"outcome_timeout: {exc}") from None


def validate_result(result: object, limits: Limits = DEFAULT_LIMITS) -> bytes | None:
    """The result of ``complete_command``: None, or bytes within ``max_payload_bytes``."""
    if result is None:
        return None
    try:
        return validate_payload(result, limits)
    except InvalidPayload as exc:
        raise InvalidPayload(f"result: {exc}") from None


def validate_reason(reason: object, limits: Limits = DEFAULT_LIMITS) -> str:
    """The reason of ``fail_command``: a str of at most ``max_reason_length`` characters."""
    if not isinstance(reason, str):
        raise InvalidInput(f"reason must be a str, not {type(reason).__name__}")
    if len(reason) > limits.max_reason_length:
        raise InvalidInput(
            f"reason is {len(reason)} characters, over the limit of {limits.max_reason_length}"
        )
    return reason


def is_command_id(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a command id as an enqueue returns it: a canonical UUID string.

    Other spellings of a UUID (upper case, braces, ``urn:uuid:``) name no command: a UUID
    column (PostgreSQL) would accept them where other backends do not.
    """
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


MAX_ACTOR_LENGTH = 200
"""The longest name ``by`` may give (who enqueued, confirmed or cancelled a command)."""


def validate_actor(by: object) -> str | None:
    """Who does a call (``by=``): None, or a name of 1 to :data:`MAX_ACTOR_LENGTH` printable
    characters.

    Raises:
        InvalidInput: anything else (nothing written).
    """
    if by is None:
        return None
    if not isinstance(by, str):
        raise InvalidInput(f"by must be a str naming who acts, not {type(by).__name__}")
    if not by or len(by) > MAX_ACTOR_LENGTH or not by.isprintable():
        raise InvalidInput(
            f"by must be 1 to {MAX_ACTOR_LENGTH} printable characters, not {by[:40]!r}"
        )
    return by
