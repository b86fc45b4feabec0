"""What every ``amqp-queue`` command shares: options, settings, exit codes and output."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click

from amqp_queue import command_io
from amqp_queue.cli.options import VERB_CONNECT_TIMEOUT, settings_from, settings_options
from amqp_queue.settings import ENV_AMQP_URL, ENV_PREFIX, Settings
from amqp_queue.state.errors import (
    CommandExpired,
    CommandNotFound,
    InvalidInput,
    OutcomeRejected,
    QueueError,
    QueueFull,
    RolloutNotFound,
)
from amqp_queue.state.factory import open_state
from amqp_queue.state.indexed_store import IndexedStore
from amqp_queue.state.model import PendingCommand
from amqp_queue.store import RabbitMQStore

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED = 1
EXIT_INVALID = 2  # also click's exit code for a usage error
EXIT_NOT_FOUND = 3
EXIT_EXPIRED = 4
EXIT_QUEUE_FULL = 5
EXIT_OUTCOME_REFUSED = 6

EPILOG = f"""\b
Exit codes: 0 ok, {EXIT_FAILED} failed (broker or state unavailable, demo found a loss),
{EXIT_INVALID} bad input or usage, {EXIT_NOT_FOUND} no such command or rollout,
{EXIT_EXPIRED} command expired, {EXIT_QUEUE_FULL} device at its limit of open commands
(--max-pending-per-device), {EXIT_OUTCOME_REFUSED} outcome refused (not delivered, or another
outcome recorded).
Settings come from flags or the environment: {ENV_AMQP_URL} for --amqp-url,
{ENV_PREFIX}<NAME> for every other (--max-ttl: {ENV_PREFIX}MAX_TTL).
"""


# -- shared options and plumbing ------------------------------------------------------------


def json_option(function: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")(function)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"amqp-queue: error: {message}", err=True)
    sys.exit(code)


def exit_code(exc: QueueError) -> int:
    """The exit code an error ends the CLI with."""
    if isinstance(exc, CommandExpired):
        return EXIT_EXPIRED
    if isinstance(exc, CommandNotFound | RolloutNotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, QueueFull):
        return EXIT_QUEUE_FULL
    if isinstance(exc, OutcomeRejected):
        return EXIT_OUTCOME_REFUSED
    if isinstance(exc, InvalidInput):
        return EXIT_INVALID
    return EXIT_FAILED


def run_with_store(settings: Settings, action: Callable[[RabbitMQStore], Awaitable[T]]) -> T:
    """Connects to the broker and opens the index, runs ``action`` on the store, closes both.

    Errors end the CLI.
    """

    async def session() -> T:
        store = await RabbitMQStore.connect(
            settings.amqp_url,
            state_url=settings.state_url,
            config=settings.rabbitmq,
            connect_timeout=settings.connect_timeout,
        )
        async with store:
            return await action(store)

    return _run(session())


def run_with_index(settings: Settings, action: Callable[[IndexedStore], Awaitable[T]]) -> T:
    """Opens only the state index, runs ``action`` on it and closes it; errors end the CLI.

    For what only reads or changes the index: the broker is not contacted, so these work
    while it is down, and cost no connection, channels or outbox pass.
    """

    async def session() -> T:
        async with await open_state(settings.state_url, limits=settings.rabbitmq.limits) as state:
            return await action(state)

    return _run(session())


def _run(session: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(session)
    except QueueError as exc:
        fail(str(exc), exit_code(exc))
    except ValueError as exc:  # a state URL no backend takes
        fail(str(exc), EXIT_INVALID)


def emit(as_json: bool, data: object, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def command_line(command: PendingCommand, *, delivered: bool = False) -> str:
    shown = command_io.encode_payload(command.payload)
    payload = shown["payload"] if shown["encoding"] == "utf-8" else f"base64:{shown['payload']}"
    if delivered:
        state = "delivered"
    elif command.requires_confirmation and not command.confirmed:
        state = "awaiting confirmation"
    else:
        state = "ready"
    kind = command.command_type or "-"
    return (
        f"{command.id}  {kind:<16} {state:<21} expires {command.expires_at:%Y-%m-%d %H:%M:%S}Z  "
        f"{payload!r}"
    )


def listing(
    as_json: bool, device: str, commands: list[PendingCommand], *, delivered: bool = False
) -> None:
    """Prints commands of a device; ``delivered``: just handed out (a drain), so says so."""
    emit(
        as_json,
        {"device_id": device, "commands": [command_io.command_json(c) for c in commands]},
        "\n".join(command_line(c, delivered=delivered) for c in commands)
        or f"(nothing for {device})",
    )


def logging_to_stderr(level: str, *, quiet_broker_client: bool) -> None:
    """Logs at ``level`` to stderr.

    Args:
        level: one of :data:`amqp_queue.cli.options.LOG_LEVELS`.
        quiet_broker_client: silence aiormq and aio-pika unless ``level`` is debug: an
            operator command's one error line says what their log of each failed
            connection attempt would.
    """
    number = logging.getLevelNamesMapping()[level.upper()]
    logging.basicConfig(
        level=number, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if quiet_broker_client and number > logging.DEBUG:
        for noisy in ("aiormq", "aio_pika"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
    else:
        # At DEBUG aiormq logs whole AMQP frames, command payloads included.
        logging.getLogger("aiormq").setLevel(max(number, logging.INFO))


def with_settings(function: Callable[..., None]) -> Callable[..., None]:
    """Adds every setting's option to an operator command, which gets one ``settings``.

    The connect timeout is short (someone is waiting) and the log quiet unless asked.
    """

    @functools.wraps(function)
    def wrapper(*, log_level: str, **options: Any) -> None:
        logging_to_stderr(log_level, quiet_broker_client=True)
        settings = settings_from(options)
        function(settings=settings, **options)

    decorate = settings_options(connect_timeout=VERB_CONNECT_TIMEOUT, log_level="warning")
    return decorate(wrapper)
