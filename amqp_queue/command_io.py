"""What the operator API and the CLI both do: enqueue by mode, payload encodings, JSON shapes.

Kept in one place so ``amqp-queue enqueue`` and ``POST /devices/{id}/commands`` accept the
same input, reject it with the same messages, and print commands the same way.
"""

from __future__ import annotations

import base64
import binascii
import enum
from typing import Any

from amqp_queue.state.errors import InvalidCommandType, InvalidInput, InvalidPayload
from amqp_queue.state.model import (
    CommandRecord,
    CommandStatus,
    Outcome,
    PendingCommand,
    RolloutSummary,
)
from amqp_queue.state.validation import Ttl
from amqp_queue.store import RabbitMQStore


class Mode(enum.StrEnum):
    """How a command is queued: the three enqueue calls of the contract."""

    PLAIN = "plain"
    """``enqueue``: ready at once, never replaced."""
    LATEST = "latest"
    """``enqueue_or_update``: replaces the undelivered command of its type (latest wins)."""
    CONFIRM = "confirm"
    """``enqueue_with_confirmation``: delivered only after an operator confirms it."""


class Encoding(enum.StrEnum):
    """How a payload is written as text."""

    UTF8 = "utf-8"
    BASE64 = "base64"


def parse_mode(value: object) -> Mode:
    """The mode named by ``value``.

    Raises:
        InvalidInput: not one of plain, latest, confirm.
    """
    if isinstance(value, str) and value in Mode.__members__.values():
        return Mode(value)
    raise InvalidInput(f"mode must be one of {', '.join(Mode)}, not {value!r}")


def decode_payload(text: object, encoding: object = Encoding.UTF8) -> bytes:
    """The payload bytes of ``text`` written in ``encoding`` (UTF-8 text or base64).

    Raises:
        InvalidPayload: ``text`` is not a string or is not valid base64.
        InvalidInput: an unknown encoding.
    """
    if not (isinstance(encoding, str) and encoding in Encoding.__members__.values()):
        raise InvalidInput(f"encoding must be one of {', '.join(Encoding)}, not {encoding!r}")
    kind = Encoding(encoding)
    if not isinstance(text, str):
        raise InvalidPayload(f"payload must be a string, not {type(text).__name__}")
    if kind is Encoding.UTF8:
        try:
            return text.encode()
        except UnicodeEncodeError as exc:
            # JSON can carry lone surrogates ("\ud800"); they have no UTF-8 form.
            raise InvalidPayload(f"payload is not valid Unicode text: {exc.reason}") from None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidPayload(f"payload is not valid base64: {exc}") from None


def encode_payload(payload: bytes) -> dict[str, str]:
    """``{"payload": ..., "encoding": ...}``: UTF-8 text when it is, base64 otherwise."""
    try:
        return {"payload": payload.decode(), "encoding": Encoding.UTF8.value}
    except UnicodeDecodeError:
        return {"payload": base64.b64encode(payload).decode(), "encoding": Encoding.BASE64.value}


async def enqueue(
    store: RabbitMQStore,
    *,
    device_id: str,
    payload: bytes,
    ttl: Ttl,
    mode: Mode = Mode.PLAIN,
    command_type: str | None = None,
    outcome_timeout: float | None = None,
    by: str | None = None,
) -> str:
    """Queues a command with the enqueue call ``mode`` names, ``by`` whom; returns its id.

    ``outcome_timeout`` (seconds after delivery, None for none) is the outcome deadline of
    DESIGN.md rule 9.

    Raises:
        InvalidCommandType: a plain command with a type, or a typed mode without one.
        InvalidInput: any other bad input (device id, payload, ttl); nothing is written.
    """
    if mode is Mode.PLAIN:
        if command_type is not None:
            raise InvalidCommandType(
                "a plain command has no command type; use mode latest or confirm to give one"
            )
        return await store.enqueue(device_id, payload, ttl, outcome_timeout=outcome_timeout, by=by)
    if command_type is None:
        raise InvalidCommandType(f"mode {mode.value} needs a command type")
    if mode is Mode.LATEST:
        return await store.enqueue_or_update(
            device_id, command_type, payload, ttl, outcome_timeout=outcome_timeout, by=by
        )
    return await store.enqueue_with_confirmation(
        device_id, command_type, payload, ttl, outcome_timeout=outcome_timeout, by=by
    )


def initial_status(mode: Mode) -> CommandStatus:
    """The status of a command just enqueued in ``mode``."""
    return CommandStatus.AWAITING_CONFIRMATION if mode is Mode.CONFIRM else CommandStatus.PENDING


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    """An outcome as JSON: its status, the result (with its encoding) or the reason, and when
    it was reported (ISO-8601)."""
    data: dict[str, Any] = {"status": outcome.status.value}
    if outcome.result is not None:
        shown = encode_payload(outcome.result)
        data["result"], data["encoding"] = shown["payload"], shown["encoding"]
    if outcome.reason is not None:
        data["reason"] = outcome.reason
    data["reported_at"] = outcome.reported_at.isoformat()
    return data


def rollout_json(summary: RolloutSummary) -> dict[str, Any]:
    """A rollout summary as JSON: its id, its total and the count of every status."""
    return {
        "rollout_id": summary.rollout_id,
        "total": summary.total,
        "counts": {status.value: count for status, count in summary.counts.items()},
    }


def command_json(command: PendingCommand | CommandRecord) -> dict[str, Any]:
    """A command as JSON: ids, type, payload with its encoding, flags and ISO-8601 times."""
    return {
        "id": command.id,
        "device_id": command.device_id,
        "command_type": command.command_type,
        **encode_payload(command.payload),
        "requires_confirmation": command.requires_confirmation,
        "confirmed": command.confirmed,
        "created_at": command.created_at.isoformat(),
        "expires_at": command.expires_at.isoformat(),
    }
