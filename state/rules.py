"""The command rules of docs/design.md in one place.

Backends decide how to store and lock; what a status is, when a command may be confirmed or
cancelled, and the order of delivery are decided here, for every backend alike.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta

from .errors import CommandExpired, CommandNotFound, OutcomeRejected, QueueFull
from .model import CommandRecord, CommandStatus, EndReason
from .validation import (
    Limits,
    validate_actor,
    validate_command_type,
    validate_outcome_timeout,
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
    outcome_timeout: object = None,
    rollout_id: str | None = None,
    enqueued_by: object = None,
) -> CommandRecord:
    """Validates every input and builds the record to insert, before anything is written.

    ``device_id`` comes validated by the store (``CommandIntake._validate_device``), which may
    be stricter than ``limits`` alone.
    """
    kind = None if command_type is None else validate_command_type(command_type, limits)
    data = validate_payload(payload, limits)
    lifetime = validate_ttl(ttl, limits)
    deadline = validate_outcome_timeout(outcome_timeout, limits)
    return CommandRecord(
        id=str(uuid.uuid4()),
        device_id=device_id,
        command_type=kind,
        payload=data,
        requires_confirmation=requires_confirmation,
        confirmed=False,
        created_at=now,
        expires_at=now + lifetime,
        outcome_timeout=deadline,
        rollout_id=rollout_id,
        enqueued_by=validate_actor(enqueued_by),
    )


def is_expired(record: CommandRecord, now: datetime) -> bool:
    return record.end_reason is EndReason.EXPIRED or (record.is_open and record.expires_at <= now)


def is_deliverable(record: CommandRecord, now: datetime) -> bool:
    """Open, ready, unexpired and not claimed by a drain: the only commands a device may be
    handed."""
    return is_deliverable_state(
        delivered=record.delivered,
        ended=record.end_reason is not None,
        requires_confirmation=record.requires_confirmation,
        confirmed=record.confirmed,
        expires_at=record.expires_at,
        claimed_until=record.claimed_until,
        now=now,
    )


def held_by_a_claim(record: CommandRecord, now: datetime) -> bool:
    """Deliverable but for another drain's live claim. A drain of the whole device stops at
    such a command: handed out, the commands behind it would overtake it (that drain may be
    cut, slow, or dead until its lease lapses, and give it back)."""
    return (
        record.claimed_until is not None
        and record.claimed_until > now
        and is_deliverable(replace(record, claimed_until=None), now)
    )


def is_deliverable_state(
    *,
    delivered: bool,
    ended: bool,
    requires_confirmation: bool,
    confirmed: bool,
    expires_at: datetime,
    claimed_until: datetime | None,
    now: datetime,
) -> bool:
    """:func:`is_deliverable` from the fields it reads (a backend that reads only those, as
    Redis does before each hand-out, asks this rather than restating it)."""
    return (
        not delivered
        and not ended
        and (not requires_confirmation or confirmed)
        and (expires_at > now)
        and (claimed_until is None or claimed_until <= now)
    )


CLAIM_LEASE = timedelta(seconds=30)
"""How long a drain's claim holds its commands for the drain's hand-over or give-back.

Only a drain whose process died between the two leaves a claim to lapse: its messages go
back to the queue with its channel, and once the lease is over the commands are deliverable
again. A drain slower than this cannot hand out twice: its hand-over takes only what is
still claimed under its own ``claimed_until``, which a later claim changes."""


def claim_until(now: datetime) -> datetime:
    """The ``claimed_until`` of a claim made at ``now``: :data:`CLAIM_LEASE` on, plus a random
    part under a second. It is also the claim's token (a hand-over or give-back acts only on
    what is still under it): two claims of one command at one instant of a coarse or frozen
    clock, the first ended by a reader, would otherwise share it."""
    return now + CLAIM_LEASE + timedelta(microseconds=secrets.randbelow(1_000_000))


def handed_over(
    record: CommandRecord, claimed_until: datetime, now: datetime
) -> CommandRecord | None:
    """A claimed command once its drain hands it over (``DELIVERED``), or None when it is no
    longer that drain's to hand out: cancelled, replaced or expired since the claim (which
    win, as they do over an open command), or given back and claimed again. The command keeps
    its ``claimed_until``: a give-back reopens only what a drain's hand-over delivered, never
    what a device's mark did (:func:`taken` clears it)."""
    if not record.is_open or record.claimed_until != claimed_until or record.expires_at <= now:
        return None
    return delivered_by_hand_over(record, now)


def delivered_by_hand_over(record: CommandRecord, now: datetime) -> CommandRecord:
    """A claimed record as its hand-over at ``now`` leaves it (the checks are the
    backend's: :func:`handed_over`)."""
    return replace(record, delivered=True, ended_at=now)


def status_of(record: CommandRecord, now: datetime) -> CommandStatus:
    if record.delivered:
        return record.outcome or CommandStatus.DELIVERED
    if record.end_reason is not None:
        return CommandStatus(record.end_reason.value)
    if record.expires_at <= now:
        return CommandStatus.EXPIRED
    if not record.is_ready:
        return CommandStatus.AWAITING_CONFIRMATION
    return CommandStatus.PENDING


TAKEN_ANYWAY = frozenset({EndReason.SUPERSEDED, EndReason.CANCELLED, EndReason.EXPIRED})
"""The ends a device's taking a command overrides (see :func:`taken`); a command refused for
good on its way out (``REJECTED``) never reached one."""


def taken(record: CommandRecord, now: datetime) -> CommandRecord | None:
    """The record once a device took it (``mark_delivered``), or None when nothing changes.

    ``consume`` marks a command after the loop body for it finished. Cancelled, replaced or
    expired meanwhile (a cancel racing the device, or a mark held up by an index outage),
    the device has it all the same: it ends ``DELIVERED``, and its outcome can be reported.
    """
    if record.delivered or (
        record.end_reason is not None and record.end_reason not in TAKEN_ANYWAY
    ):
        return None
    return replace(record, delivered=True, end_reason=None, ended_at=now, claimed_until=None)


def end_of_replaced(record: CommandRecord, now: datetime) -> EndReason:
    """How an open command ends when a newer one of its type replaces it."""
    return EndReason.EXPIRED if record.expires_at <= now else EndReason.SUPERSEDED


def confirmed(record: CommandRecord, now: datetime, by: str | None = None) -> CommandRecord | None:
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
    return replace(record, confirmed=True, confirmed_at=now, confirmed_by=by)


def confirmed_by_call(record: CommandRecord, now: datetime, by: str | None) -> bool:
    """Whether ``record`` holds a confirm made at ``now`` by ``by`` (and is not delivered
    yet): asked by a call whose earlier attempt wrote that confirm and lost the reply, it
    is that call's own write. Times are stored to the microsecond on every backend."""
    return (
        record.confirmed
        and not record.delivered
        and record.confirmed_at == now
        and record.confirmed_by == by
    )


def cancelled_by_call(record: CommandRecord, now: datetime, by: str | None) -> bool:
    """Whether ``record`` holds the cancel of a call made at ``now`` by ``by``: see
    :func:`confirmed_by_call`."""
    return (
        record.end_reason is EndReason.CANCELLED
        and record.ended_at == now
        and record.cancelled_by == by
    )


def cancelled(record: CommandRecord, now: datetime, by: str | None = None) -> CommandRecord:
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
    return replace(record, end_reason=EndReason.CANCELLED, ended_at=now, cancelled_by=by)


def in_ready_order(records: Iterable[CommandRecord]) -> list[CommandRecord]:
    """Delivery order: when each command became ready, ties kept in the given (write) order."""
    return sorted(records, key=lambda record: record.ready_at)


def given_back_delivered(record: CommandRecord) -> bool:
    """Whether a give-back reopens this delivered command: a drain's hand-over delivered it
    (it still holds its claim's ``claimed_until``) and no outcome proves a device took it."""
    return record.delivered and record.outcome is None and record.claimed_until is not None


def released(
    record: CommandRecord, now: datetime, *, slot_taken: bool, unpublish: bool
) -> CommandRecord:
    """A command given back by a cancelled drain (see ``IndexedStore.release``): claimed and
    still open, its claim ends (expired meanwhile, the expiry sweep ends it); delivered, it
    is open again unless it ended meanwhile."""
    if record.is_open:
        published_at = None if unpublish else record.published_at
        return replace(record, claimed_until=None, published_at=published_at)
    if record.expires_at <= now:
        return replace(record, delivered=False, end_reason=EndReason.EXPIRED, claimed_until=None)
    if slot_taken:
        return replace(record, delivered=False, end_reason=EndReason.SUPERSEDED, claimed_until=None)
    return replace(
        record,
        delivered=False,
        ended_at=None,
        published_at=None if unpublish else record.published_at,
        claimed_until=None,
    )


def reported(
    record: CommandRecord,
    outcome: CommandStatus,
    now: datetime,
    *,
    result: bytes | None = None,
    reason: str | None = None,
) -> CommandRecord | None:
    """The record after an outcome report (rule 9), or None when it was reported already.

    Only a delivered command takes an outcome; the same report again (same status, result
    and reason) changes nothing.

    Raises:
        OutcomeRejected: the command was not delivered, or holds another outcome (a report
            after ``TIMED_OUT`` included).
    """
    if not record.delivered:
        if record.end_reason is not None or record.expires_at <= now:
            ended = record.end_reason.value if record.end_reason else "expired"
            raise OutcomeRejected(record.id, f"it was never delivered (it ended {ended})")
        raise OutcomeRejected(record.id, "it was not delivered yet")
    if record.outcome is not None:
        same = (record.outcome, record.outcome_result, record.outcome_reason) == (
            outcome,
            result,
            reason,
        )
        if same:
            return None
        raise OutcomeRejected(record.id, f"its outcome is already {record.outcome.value}")
    return replace(
        record, outcome=outcome, outcome_result=result, outcome_reason=reason, outcome_at=now
    )


def outcome_overdue(record: CommandRecord, now: datetime) -> bool:
    """Delivered, no outcome, and its deadline (delivery time + ``outcome_timeout``) passed."""
    if not record.awaits_outcome or record.ended_at is None:
        return False
    assert record.outcome_timeout is not None
    return record.ended_at + timedelta(seconds=record.outcome_timeout) <= now


def check_room(device_id: str, before: int, after: int, limits: Limits) -> None:
    """Refuses a write that takes a device's open commands from ``before`` to ``after`` over
    ``limits.max_pending_per_device`` (rule 11). A replacement adds nothing, and a device
    already over the limit (it was lowered) may still have its commands replaced.

    Raises:
        QueueFull: the write adds commands past the limit.
    """
    if after > before and after > limits.max_pending_per_device:
        raise QueueFull(device_id, limits.max_pending_per_device)


def open_after_add(
    open_now: Iterable[CommandRecord], records: Iterable[CommandRecord], now: datetime
) -> tuple[int, int]:
    """A device's open, unexpired commands before and after adding ``records`` (its own, in
    order): typed ones replace the open command of their slot (rule 3)."""
    live = [record for record in open_now if record.is_open and record.expires_at > now]
    slots = {record.command_type for record in live if record.command_type is not None}
    after = len(live)
    for record in records:
        if record.command_type is None or record.command_type not in slots:
            after += 1
        if record.command_type is not None:
            slots.add(record.command_type)
    return len(live), after


def sibling(record: CommandRecord, device_id: str) -> CommandRecord:
    """The same command for another device (``enqueue_many``), with an id of its own."""
    return replace(record, id=str(uuid.uuid4()), device_id=device_id)
