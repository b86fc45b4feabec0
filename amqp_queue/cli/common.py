"""What every ``amqp-queue`` command shares: options, settings, exit codes and output."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import click

from amqp_queue import command_io
from amqp_queue.settings import (
    DEFAULT_AMQP_URL,
    DEFAULT_EXCHANGE,
    ENV_AMQP_URL,
    ENV_BIND,
    ENV_CLEANUP_INTERVAL,
    ENV_EXCHANGE,
    ENV_STATE_URL,
    ENV_TOKENS,
    Settings,
)
from amqp_queue.state.errors import CommandExpired, CommandNotFound, InvalidInput, QueueError
from amqp_queue.state.factory import DEFAULT_STATE_URL
from amqp_queue.state.model import PendingCommand
from amqp_queue.store import RabbitMQStore

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED = 1
EXIT_INVALID = 2  # also click's exit code for a usage error
EXIT_NOT_FOUND = 3
EXIT_EXPIRED = 4

EPILOG = f"""\b
Exit codes: 0 ok, {EXIT_FAILED} failed (broker or state unavailable, demo found a loss),
{EXIT_INVALID} bad input or usage, {EXIT_NOT_FOUND} no such command, {EXIT_EXPIRED} command expired.
Settings come from flags or the environment: {ENV_AMQP_URL}, {ENV_STATE_URL},
{ENV_EXCHANGE}, and for serve {ENV_BIND}, {ENV_TOKENS}, {ENV_CLEANUP_INTERVAL}.
"""


# -- shared options and plumbing ------------------------------------------------------------


def connection_options(function: F) -> F:
    """Adds the broker and state options every command shares."""
    options = [
        click.option(
            "--amqp-url",
            envvar=ENV_AMQP_URL,
            default=DEFAULT_AMQP_URL,
            show_default=True,
            help="The RabbitMQ broker.",
        ),
        click.option(
            "--state-url",
            envvar=ENV_STATE_URL,
            default=DEFAULT_STATE_URL,
            show_default=True,
            help="The state index: sqlite+aiosqlite://, postgresql+asyncpg://, redis://.",
        ),
        click.option(
            "--exchange",
            envvar=ENV_EXCHANGE,
            default=DEFAULT_EXCHANGE,
            show_default=True,
            help="The exchange; device queues are named <exchange>.<device>.",
        ),
        click.option(
            "--connect-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=10.0,
            show_default=True,
            help="Seconds to keep trying to reach the broker.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def json_option(function: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")(function)


def settings_from(options: dict[str, Any], **extra: Any) -> Settings:
    return Settings(
        amqp_url=options.pop("amqp_url"),
        state_url=options.pop("state_url"),
        exchange=options.pop("exchange"),
        connect_timeout=options.pop("connect_timeout"),
        **extra,
    )


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"amqp-queue: error: {message}", err=True)
    sys.exit(code)


def exit_code(exc: QueueError) -> int:
    """The exit code an error ends the CLI with."""
    if isinstance(exc, CommandExpired):
        return EXIT_EXPIRED
    if isinstance(exc, CommandNotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, InvalidInput):
        return EXIT_INVALID
    return EXIT_FAILED


def run_with_store(settings: Settings, action: Callable[[RabbitMQStore], Awaitable[T]]) -> T:
    """Opens the store, runs ``action`` on it and closes it; errors end the CLI."""

    async def session() -> T:
        store = await RabbitMQStore.connect(
            settings.amqp_url,
            state_url=settings.state_url,
            config=settings.rabbitmq,
            connect_timeout=settings.connect_timeout,
        )
        async with store:
            return await action(store)

    try:
        return asyncio.run(session())
    except QueueError as exc:
        fail(str(exc), exit_code(exc))
    except ValueError as exc:  # a state URL no backend takes
        fail(str(exc), EXIT_INVALID)


def emit(as_json: bool, data: object, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def command_line(command: PendingCommand) -> str:
    shown = command_io.encode_payload(command.payload)
    payload = shown["payload"] if shown["encoding"] == "utf-8" else f"base64:{shown['payload']}"
    state = (
        "awaiting confirmation"
        if command.requires_confirmation and not command.confirmed
        else "ready"
    )
    kind = command.command_type or "-"
    return (
        f"{command.id}  {kind:<16} {state:<21} expires {command.expires_at:%Y-%m-%d %H:%M:%S}Z  "
        f"{payload!r}"
    )


def listing(as_json: bool, device: str, commands: list[PendingCommand]) -> None:
    emit(
        as_json,
        {"device_id": device, "commands": [command_io.command_json(c) for c in commands]},
        "\n".join(command_line(c) for c in commands) or f"(nothing for {device})",
    )


def logging_to_stderr(level: int) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # At DEBUG aiormq logs whole AMQP frames, command payloads included.
    logging.getLogger("aiormq").setLevel(max(level, logging.INFO))


def with_settings(function: Callable[..., None]) -> Callable[..., None]:
    """Turns the shared connection options into one ``settings`` argument."""

    @functools.wraps(function)
    def wrapper(**options: Any) -> None:
        logging_to_stderr(logging.WARNING)
        # Each failed connection attempt is logged there; the one error message says it all.
        for noisy in ("aiormq", "aio_pika"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
        settings = settings_from(options)
        function(settings=settings, **options)

    return wrapper
