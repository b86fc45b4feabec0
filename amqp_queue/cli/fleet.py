"""The fleet commands: report an outcome, run a rollout, retire a device.

Reporting an outcome, a rollout's status and cancelling a rollout only read or change the
state index (they work while the broker is down); creating and confirming a rollout publish,
and retiring deletes the device's queue, so those need the broker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TextIO

import click

from amqp_queue import command_io
from amqp_queue.cli.common import (
    EPILOG,
    emit,
    fail,
    json_option,
    run_with_index,
    run_with_store,
    with_settings,
)
from amqp_queue.settings import Settings
from amqp_queue.state.errors import InvalidDeviceId
from amqp_queue.state.indexed_store import IndexedStore
from amqp_queue.state.model import Outcome, Rollout, RolloutSummary
from amqp_queue.store import RabbitMQStore

# -- outcomes (rule 9) ------------------------------------------------------------------------


@click.group(epilog=EPILOG)
def outcome() -> None:
    """Report how a delivered command went (as its gateway would)."""


def _report(
    settings: Settings,
    command_id: str,
    as_json: bool,
    report: Callable[[IndexedStore], Awaitable[None]],
) -> None:
    """Runs ``report`` on the index and prints the outcome it recorded."""

    async def action(state: IndexedStore) -> Outcome | None:
        await report(state)
        return await state.get_outcome(command_id)

    found = run_with_index(settings, action)
    if found is None:  # an outcome is final: only a prune racing this call removes it
        fail(f"command {command_id!r}: the outcome was pruned as it was recorded")
    data = command_io.outcome_json(found)
    emit(as_json, {"id": command_id, "status": data["status"], "outcome": data}, data["status"])


@outcome.command(epilog=EPILOG)
@click.argument("command_id")
@click.argument("result", required=False)
@click.option("--base64", "is_base64", is_flag=True, help="RESULT is base64, not UTF-8 text.")
@json_option
@with_settings
def complete(
    settings: Settings, command_id: str, result: str | None, is_base64: bool, as_json: bool
) -> None:
    """Record that a delivered command succeeded, with an optional RESULT.

    Reporting the same outcome twice is harmless.
    """

    async def report(state: IndexedStore) -> None:
        data = None
        if result is not None:
            data = command_io.decode_payload(result, "base64" if is_base64 else "utf-8")
        await state.complete_command(command_id, data)

    _report(settings, command_id, as_json, report)


@outcome.command(name="fail", epilog=EPILOG)
@click.argument("command_id")
@click.argument("reason")
@json_option
@with_settings
def fail_outcome(settings: Settings, command_id: str, reason: str, as_json: bool) -> None:
    """Record that a delivered command failed, and why (REASON)."""
    _report(settings, command_id, as_json, lambda state: state.fail_command(command_id, reason))


# -- rollouts (rule 10) -----------------------------------------------------------------------


@click.group(epilog=EPILOG)
def rollout() -> None:
    """Queue one command for many devices at once, and follow, confirm or cancel it."""


def read_devices(source: TextIO) -> list[str]:
    """Device ids one a line; blank lines and lines starting with '#' are skipped.

    Raises:
        InvalidDeviceId: the file holds no device id.
    """
    devices = [line.strip() for line in source]
    found = [device for device in devices if device and not device.startswith("#")]
    if not found:
        raise InvalidDeviceId("the device list is empty (one device id a line)")
    return found


@rollout.command(epilog=EPILOG)
@click.argument("devices", type=click.File("r"))
@click.argument("payload")
@click.option("--ttl", type=float, default=300.0, show_default=True, help="Time to live, seconds.")
@click.option("--type", "command_type", help="Replace each device's open command of this type.")
@click.option(
    "--confirm",
    "requires_confirmation",
    is_flag=True,
    help="Deliver only after `amqp-queue rollout confirm` (needs --type).",
)
@click.option("--outcome-timeout", type=float, help="Seconds after delivery to report by.")
@click.option("--base64", "is_base64", is_flag=True, help="PAYLOAD is base64, not UTF-8 text.")
@json_option
@with_settings
def create(
    settings: Settings,
    devices: TextIO,
    payload: str,
    ttl: float,
    command_type: str | None,
    requires_confirmation: bool,
    outcome_timeout: float | None,
    is_base64: bool,
    as_json: bool,
) -> None:
    """Queue PAYLOAD for every device listed in the file DEVICES ('-': standard input).

    One device id a line. Prints the rollout id; nothing is written if any id is bad or
    any device is at its limit.

    \b
    amqp-queue rollout create devices.txt fw-2.1 --type firmware --confirm
    cat devices.txt | amqp-queue rollout create - reboot --ttl 3600
    """
    try:
        device_ids = read_devices(devices)
    except InvalidDeviceId as exc:
        raise click.BadParameter(str(exc), param_hint="DEVICES") from None

    async def action(store: RabbitMQStore) -> Rollout:
        data = command_io.decode_payload(payload, "base64" if is_base64 else "utf-8")
        return await store.enqueue_many(
            device_ids,
            data,
            ttl,
            command_type=command_type,
            requires_confirmation=requires_confirmation,
            outcome_timeout=outcome_timeout,
        )

    made = run_with_store(settings, action)
    data = {"rollout_id": made.rollout_id, "command_ids": list(made.command_ids)}
    emit(as_json, data, made.rollout_id)


def _summary_line(summary: RolloutSummary) -> str:
    counts = ", ".join(f"{status.value} {n}" for status, n in summary.counts.items() if n)
    return f"{summary.rollout_id}: {summary.total} commands: {counts}"


@rollout.command(epilog=EPILOG)
@click.argument("rollout_id")
@json_option
@with_settings
def status(settings: Settings, rollout_id: str, as_json: bool) -> None:
    """Print a rollout's commands counted by status."""
    summary = run_with_index(settings, lambda state: state.rollout_summary(rollout_id))
    emit(as_json, command_io.rollout_json(summary), _summary_line(summary))


@rollout.command(name="confirm", epilog=EPILOG)
@click.argument("rollout_id")
@json_option
@with_settings
def confirm_rollout(settings: Settings, rollout_id: str, as_json: bool) -> None:
    """Confirm every command of a rollout awaiting confirmation."""
    confirmed = run_with_store(settings, lambda store: store.confirm_rollout(rollout_id))
    emit(
        as_json,
        {"rollout_id": rollout_id, "confirmed": confirmed},
        f"confirmed {confirmed} commands of {rollout_id}",
    )


@rollout.command(name="cancel", epilog=EPILOG)
@click.argument("rollout_id")
@json_option
@with_settings
def cancel_rollout(settings: Settings, rollout_id: str, as_json: bool) -> None:
    """Cancel every open command of a rollout."""
    cancelled = run_with_index(settings, lambda state: state.cancel_rollout(rollout_id))
    emit(
        as_json,
        {"rollout_id": rollout_id, "cancelled": cancelled},
        f"cancelled {cancelled} commands of {rollout_id}",
    )


# -- retiring a device ------------------------------------------------------------------------


@click.command(epilog=EPILOG)
@click.argument("device")
@json_option
@with_settings
def retire(settings: Settings, device: str, as_json: bool) -> None:
    """Retire DEVICE: cancel its open commands and delete its queue."""
    cancelled = run_with_store(settings, lambda store: store.retire_device(device))
    emit(
        as_json,
        {"device_id": device, "cancelled": cancelled},
        f"retired {device}: {cancelled} open commands cancelled, queue deleted",
    )
