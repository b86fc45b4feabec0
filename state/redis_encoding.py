"""How a command is stored as a Redis hash: the encoding both the store and its scripts read.

Times are integer microseconds since the epoch (exact, and sortable as scores), booleans
``0``/``1``, absent fields for None, plus ``seq``, the write order. The key layout and the
scripts are in :mod:`amqp_queue.state.redis_scripts`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from . import rules
from .errors import StateError
from .model import CommandRecord, CommandStatus, EndReason

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_T = TypeVar("_T")

Hash = Mapping[bytes | str, bytes | str]
"""A command hash as redis-py returns it (bytes, as the store's client never decodes)."""


def encode_time(moment: datetime) -> str:
    """A datetime as integer microseconds since the epoch: exact, and sortable as a score."""
    return str((moment - _EPOCH) // _MICROSECOND)


def milliseconds(span: timedelta) -> int:
    """A key TTL: a duration in whole milliseconds, rounded up."""
    return math.ceil(span / timedelta(milliseconds=1))


def as_text(value: bytes | str) -> str:
    """A reply of the store's non-decoding client as text."""
    return value.decode() if isinstance(value, bytes) else value


def encode_flag(value: bool) -> str:
    return "1" if value else "0"


def record_fields(record: CommandRecord) -> dict[str, str | bytes]:
    """A record as hash fields; None fields are left out (``seq`` is the scripts' to set)."""
    fields: dict[str, str | bytes] = {
        "id": record.id,
        "device_id": record.device_id,
        "payload": record.payload,
        "requires_confirmation": encode_flag(record.requires_confirmation),
        "confirmed": encode_flag(record.confirmed),
        "delivered": encode_flag(record.delivered),
        "created_at": encode_time(record.created_at),
        "expires_at": encode_time(record.expires_at),
    }
    if record.command_type is not None:
        fields["command_type"] = record.command_type
    if record.end_reason is not None:
        fields["end_reason"] = record.end_reason.value
    if record.outcome is not None:
        fields["outcome"] = record.outcome.value
    if record.outcome_result is not None:
        fields["outcome_result"] = record.outcome_result
    if record.outcome_reason is not None:
        fields["outcome_reason"] = record.outcome_reason
    if record.outcome_timeout is not None:
        fields["outcome_timeout"] = repr(record.outcome_timeout)
    if record.rollout_id is not None:
        fields["rollout_id"] = record.rollout_id
    for who in ("enqueued_by", "confirmed_by", "cancelled_by"):
        name = getattr(record, who)
        if name is not None:
            fields[who] = name
    for name, moment in (
        ("confirmed_at", record.confirmed_at),
        ("ended_at", record.ended_at),
        ("published_at", record.published_at),
        ("outcome_at", record.outcome_at),
        ("claimed_until", record.claimed_until),
    ):
        if moment is not None:
            fields[name] = encode_time(moment)
    return fields


def add_arguments(record: CommandRecord, key_ttl: timedelta) -> list[str | bytes]:
    """A new record as the ADD script takes it
    (:data:`~amqp_queue.state.redis_add_scripts.ADD`)."""
    return [
        record.id,
        record.device_id,
        record.command_type or "",
        record.payload,
        encode_flag(record.requires_confirmation),
        encode_time(record.created_at),
        encode_time(record.expires_at),
        str(milliseconds(key_ttl)),
        "" if record.outcome_timeout is None else repr(record.outcome_timeout),
        record.rollout_id or "",
        record.enqueued_by or "",
    ]


def changed_fields(
    current: CommandRecord, updated: CommandRecord
) -> tuple[list[str | bytes], list[str]]:
    """The hash fields to write (name, value, ...) and to delete to turn one into the other."""
    before, after = record_fields(current), record_fields(updated)
    written: list[str | bytes] = []
    for name, value in after.items():
        if before.get(name) != value:
            written += [name, value]
    return written, [name for name in before if name not in after]


LIVENESS_FIELDS = (
    "delivered",
    "end_reason",
    "requires_confirmation",
    "confirmed",
    "expires_at",
    "claimed_until",
)
"""The fields :func:`is_live` reads: what ``rules.is_deliverable`` looks at, and no payload."""


def is_live(values: Sequence[bytes | str | None], now: datetime) -> bool:
    """``rules.is_deliverable`` of a stored command, from its :data:`LIVENESS_FIELDS` (all
    None for a command Redis does not hold).

    consume() asks it before every hand-out: decoding the whole hash, payload and all, cost
    more than the round trip.
    """
    delivered, end_reason, requires_confirmation, confirmed, expires_at, claimed_until = (
        value.encode() if isinstance(value, str) else value for value in values
    )
    if expires_at is None:
        return False
    return rules.is_deliverable_state(
        delivered=delivered == b"1",
        ended=end_reason is not None,
        requires_confirmation=requires_confirmation == b"1",
        confirmed=confirmed == b"1",
        expires_at=_EPOCH + int(expires_at) * _MICROSECOND,
        claimed_until=None if claimed_until is None else _EPOCH + int(claimed_until) * _MICROSECOND,
        now=now,
    )


def decode_record(fields: Hash) -> tuple[int, CommandRecord]:
    """A stored hash as (write order, record).

    Raises:
        StateError: the hash is not a command (a field is missing).
    """

    def raw(name: str) -> bytes | None:
        value = fields.get(name.encode())
        return value.encode() if isinstance(value, str) else value

    def text(name: str) -> str | None:
        value = raw(name)
        return None if value is None else value.decode()

    def time(name: str) -> datetime | None:
        value = raw(name)
        return None if value is None else _EPOCH + int(value) * _MICROSECOND

    def required(value: _T | None, name: str) -> _T:
        if value is None:
            raise StateError(f"stored command is missing its {name!r} field")
        return value

    reason = text("end_reason")
    outcome = text("outcome")
    timeout = text("outcome_timeout")
    record = CommandRecord(
        id=required(text("id"), "id"),
        device_id=required(text("device_id"), "device_id"),
        command_type=text("command_type"),
        payload=required(raw("payload"), "payload"),
        requires_confirmation=raw("requires_confirmation") == b"1",
        confirmed=raw("confirmed") == b"1",
        created_at=required(time("created_at"), "created_at"),
        expires_at=required(time("expires_at"), "expires_at"),
        confirmed_at=time("confirmed_at"),
        delivered=raw("delivered") == b"1",
        end_reason=None if reason is None else EndReason(reason),
        ended_at=time("ended_at"),
        published_at=time("published_at"),
        outcome=None if outcome is None else CommandStatus(outcome),
        outcome_result=raw("outcome_result"),
        outcome_reason=text("outcome_reason"),
        outcome_at=time("outcome_at"),
        outcome_timeout=None if timeout is None else float(timeout),
        rollout_id=text("rollout_id"),
        enqueued_by=text("enqueued_by"),
        confirmed_by=text("confirmed_by"),
        cancelled_by=text("cancelled_by"),
        claimed_until=time("claimed_until"),
    )
    return int(required(raw("seq"), "seq")), record


def decode_replies(replies: Sequence[Sequence[bytes]]) -> list[tuple[int, CommandRecord]]:
    """A script's list of flat HGETALL replies as (write order, record), oldest write first."""
    decoded = (decode_record(dict(zip(flat[::2], flat[1::2], strict=True))) for flat in replies)
    return sorted(decoded, key=lambda item: item[0])
