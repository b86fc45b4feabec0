"""The operator commands: enqueue, list, inspect, confirm, cancel, clean up, drain, consume.

Those that only read or change the state index (pending, confirmations, status, cancel,
cleanup) open only the index: they work while the broker is down. Cancelling needs no
broker: a cancelled command already queued is dropped when it is delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import click

from amqp_queue import command_io
from amqp_queue.cli.common import (
    EPILOG,
    command_line,
    emit,
    json_option,
    listing,
    run_with_index,
    run_with_store,
    with_settings,
)
from amqp_queue.settings import Settings
from amqp_queue.state.indexed_store import IndexedStore
from amqp_queue.state.model import PendingCommand
from amqp_queue.store import RabbitMQStore

# -- operator commands ----------------------------------------------------------------------


@click.command(epilog=EPILOG)
@click.argument("device")
@click.argument("payload")
@click.option("--ttl", type=float, default=300.0, show_default=True, help="Time to live, seconds.")
@click.option(
    "--mode",
    type=click.Choice([mode.value for mode in command_io.Mode]),
    default=command_io.Mode.PLAIN.value,
    show_default=True,
    help="plain: enqueue; latest: replace the undelivered command of --type; "
    "confirm: deliver only after `amqp-queue confirm`.",
)
@click.option("--type", "command_type", help="The command type (needed by latest and confirm).")
@click.option("--base64", "is_base64", is_flag=True, help="PAYLOAD is base64, not UTF-8 text.")
@click.option(
    "--outcome-timeout",
    type=float,
    help="Seconds after delivery to report an outcome by; then it is timed_out at cleanup.",
)
@json_option
@with_settings
def enqueue(
    settings: Settings,
    device: str,
    payload: str,
    ttl: float,
    mode: str,
    command_type: str | None,
    is_base64: bool,
    outcome_timeout: float | None,
    as_json: bool,
) -> None:
    """Queue PAYLOAD for DEVICE and print the command's id.

    \b
    amqp-queue enqueue gw-7 reboot
    amqp-queue enqueue gw-7 21.5 --mode latest --type setpoint --ttl 600
    amqp-queue enqueue gw-7 door-1 --mode confirm --type unlock
    """
    kind = command_io.Mode(mode)

    async def action(store: RabbitMQStore) -> str:
        data = command_io.decode_payload(payload, "base64" if is_base64 else "utf-8")
        return await command_io.enqueue(
            store,
            device_id=device,
            payload=data,
            ttl=ttl,
            mode=kind,
            command_type=command_type,
            outcome_timeout=outcome_timeout,
        )

    command_id = run_with_store(settings, action)
    status = command_io.initial_status(kind).value
    emit(as_json, {"id": command_id, "status": status}, command_id)


@click.command(epilog=EPILOG)
@click.argument("device")
@json_option
@with_settings
def pending(settings: Settings, device: str, as_json: bool) -> None:
    """List DEVICE's pending commands.

    Those awaiting confirmation are included.
    """

    async def action(state: IndexedStore) -> list[PendingCommand]:
        return await state.get_pending(settings.rabbitmq.validate_device(device))

    listing(as_json, device, run_with_index(settings, action))


@click.command(epilog=EPILOG)
@click.argument("device")
@json_option
@with_settings
def confirmations(settings: Settings, device: str, as_json: bool) -> None:
    """List DEVICE's commands awaiting confirmation."""

    async def action(state: IndexedStore) -> list[PendingCommand]:
        return await state.get_pending_confirmations(settings.rabbitmq.validate_device(device))

    listing(as_json, device, run_with_index(settings, action))


@click.command(epilog=EPILOG)
@click.argument("command_id")
@json_option
@with_settings
def status(settings: Settings, command_id: str, as_json: bool) -> None:
    """Print a command's status."""
    found = run_with_index(settings, lambda state: state.get_status(command_id))
    emit(as_json, {"id": command_id, "status": found.value}, found.value)


@click.command(epilog=EPILOG)
@click.argument("command_id")
@json_option
@with_settings
def confirm(settings: Settings, command_id: str, as_json: bool) -> None:
    """Confirm a command so it can be delivered.

    Confirming twice is harmless.
    """

    async def action(store: RabbitMQStore) -> tuple[bool, str]:
        changed = await store.confirm_changed(command_id)
        return changed, (await store.get_status(command_id)).value

    changed, found = run_with_store(settings, action)
    # A plain, already confirmed or delivered command needs nothing: say so rather than
    # "confirmed", which an operator reads as an approval given now.
    line = (
        f"confirmed {command_id}: {found}"
        if changed
        else f"{command_id}: {found} (no confirmation needed; nothing changed)"
    )
    emit(as_json, {"id": command_id, "status": found}, line)


@click.command(epilog=EPILOG)
@click.argument("command_id")
@json_option
@with_settings
def cancel(settings: Settings, command_id: str, as_json: bool) -> None:
    """Cancel an undelivered command."""
    run_with_index(settings, lambda state: state.cancel_command(command_id))
    emit(as_json, {"id": command_id, "status": "cancelled"}, f"cancelled {command_id}")


@click.command(epilog=EPILOG)
@json_option
@with_settings
def cleanup(settings: Settings, as_json: bool) -> None:
    """End expired commands; prune old finished ones."""
    expired = run_with_index(settings, lambda state: state.cleanup())
    emit(as_json, {"expired": expired}, f"expired {expired}")


@click.command(epilog=EPILOG)
@click.argument("device")
@json_option
@with_settings
def drain(settings: Settings, device: str, as_json: bool) -> None:
    """Take every ready command of DEVICE now (as on reconnect).

    The commands printed are marked delivered.
    """
    records = run_with_store(settings, lambda store: store.drain_commands(device))
    listing(as_json, device, [record.to_pending() for record in records], delivered=True)


@click.command(epilog=EPILOG)
@click.argument("device")
@json_option
@with_settings
def consume(settings: Settings, device: str, as_json: bool) -> None:
    """Print DEVICE's commands as they arrive, until Ctrl-C.

    Each command printed is marked delivered. With --json, one JSON object per line.
    """

    async def action(store: RabbitMQStore) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        async def read() -> None:
            async with store.consume(device) as stream:
                async for command in stream:
                    data = command_io.command_json(command)
                    click.echo(json.dumps(data) if as_json else command_line(command))

        reader = asyncio.create_task(read())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({reader, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in (reader, stopped):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # re-raises what ended the reader, if not the stop

    run_with_store(settings, action)
