"""The command rules of docs/design.md in one place.

Backends decide how to store and lock; what a status is, when a command may be confirmed or
cancelled, and the order of delivery are decided here, for every backend alike.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime

from .errors import CommandExpired, CommandNotFound
from .model import CommandRecord, CommandStatus, EndReason
from .validation import (
    Limits,
    validate_command_type,
    validate_payload,
    validate_ttl,
)


def new_command(
    *,
    device_id: str,
    command_type: object | None,
    payload: object,
    ttl: object,
    requires_confirmation: bool,
    now: datetime,
    limits: Limits,
) -> CommandRecord:
    """Validates every input and builds the record to insert, before anything is written.

    ``device_id`` comes validated by the store (``CommandIntake._validate_device``), which may
    be stricter than ``limits`` alone.
    """
    kind = None if command_type is None else validate_command_type(command_type, limits)
    data = validate_payload(payload, limits)
    lifetime = validate_ttl(ttl, limits)
    return CommandRecord(
        id=str(uuid.uuid4()),
        device_id=device_id,
        command_type=kind,
        payload=data,
        requires_confirmation=requires_confirmation,
        confirmed=False,
        created_at=now,
        expires_at=now + lifetime,
    )


def is_expired(record: CommandRecord, now: datetime) -> bool:
    return record.end_reason is EndReason.EXPIRED or (record.is_open and record.expires_at <= now)


def is_deliverable(record: CommandRecord, now: datetime) -> bool:
    """Open, ready and unexpired: the only commands a device may be handed."""
    return record.is_open and record.is_ready and record.expires_at > now


def status_of(record: CommandRecord, now: datetime) -> CommandStatus:
    if record.delivered:
        return CommandStatus.DELIVERED
    if record.end_reason is not None:
        return CommandStatus(record.end_reason.value)
    if record.expires_at <= now:
        return CommandStatus.EXPIRED
    if not record.is_ready:
        return CommandStatus.AWAITING_CONFIRMATION
    return CommandStatus.PENDING


def end_of_replaced(record: CommandRecord, now: datetime) -> EndReason:
    """How an open command ends when a newer one of its type replaces it."""
    return EndReason.EXPIRED if record.expires_at <= now else EndReason.SUPERSEDED


def confirmed(record: CommandRecord, now: datetime) -> CommandRecord | None:
    """The record after ``confirm_command``, or None when nothing changes.

    Confirming twice, or confirming a command that needs no confirmation or was already
    delivered, is harmless.

    Raises:
        CommandExpired: the command's TTL ran out.
        CommandNotFound: the command was cancelled or superseded.
    """
    if is_expired(record, now):
        raise CommandExpired(record.id)
    if record.end_reason is not None:
        raise CommandNotFound(record.id, record.end_reason.value)
    if record.delivered or not record.requires_confirmation or record.confirmed:
        return None
    return replace(record, confirmed=True, confirmed_at=now)


def cancelled(record: CommandRecord, now: datetime) -> CommandRecord:
    """The record after ``cancel_command``.

    Raises:
        CommandExpired: the command's TTL ran out (it is finished already).
        CommandNotFound: the command was delivered, cancelled or superseded.
    """
    if record.delivered:
        raise CommandNotFound(record.id, "already delivered")
    if is_expired(record, now):
        raise CommandExpired(record.id)
    if record.end_reason is not None:
        raise CommandNotFound(record.id, f"already {record.end_reason.value}")
    return replace(record, end_reason=EndReason.CANCELLED, ended_at=now)


def in_ready_order(records: Iterable[CommandRecord]) -> list[CommandRecord]:
    """Delivery order: when each command became ready, ties kept in the given (write) order."""
    return sorted(records, key=lambda record: record.ready_at)


def released(
    record: CommandRecord, now: datetime, *, slot_taken: bool, unpublish: bool
) -> CommandRecord:
    """A delivered command given back by a cancelled drain (see ``IndexedStore.release``)."""
    if record.expires_at <= now:
        return replace(record, delivered=False, end_reason=EndReason.EXPIRED)
    if slot_taken:
        return replace(record, delivered=False, end_reason=EndReason.SUPERSEDED)
    return replace(
        record,
        delivered=False,
        ended_at=None,
        published_at=None if unpublish else record.published_at,
    )
