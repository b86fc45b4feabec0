"""The long-running commands: ``serve`` (the sidecar service) and ``demo``."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from amqp_queue.auth import TokenConfigError, Tokens
from amqp_queue.cli.common import (
    EPILOG,
    EXIT_FAILED,
    EXIT_INVALID,
    emit,
    exit_code,
    fail,
    json_option,
    logging_to_stderr,
)
from amqp_queue.cli.options import (
    POSITIVE,
    SERVE_CONNECT_TIMEOUT,
    VERB_CONNECT_TIMEOUT,
    amqp_url_option,
    connect_timeout_option,
    knob_options,
    log_level_option,
    rabbitmq_from,
    settings_from,
    settings_options,
)
from amqp_queue.settings import (
    DEFAULT_BIND,
    DEFAULT_CLEANUP_INTERVAL,
    ENV_BIND,
    ENV_CLEANUP_INTERVAL,
    ENV_FOUR_EYES,
    ENV_TOKENS,
    parse_bind,
)
from amqp_queue.state.errors import QueueError

# -- the service and the demo -------------------------------------------------------------


@click.command(epilog=EPILOG)
@click.option(
    "--bind",
    envvar=ENV_BIND,
    show_envvar=True,
    default=DEFAULT_BIND,
    show_default=True,
    help="host:port the HTTP API listens on (:8080 for every interface).",
)
@click.option(
    "--tokens",
    envvar=ENV_TOKENS,
    show_envvar=True,
    default="",
    help="Operator API bearer tokens, name:token,name2:token2:role; a role (viewer, operator, "
    "approver) limits a token, none gives every right. Prefer the environment "
    f"variable {ENV_TOKENS}: flags are visible in the process list.",
)
@click.option(
    "--cleanup-interval",
    envvar=ENV_CLEANUP_INTERVAL,
    show_envvar=True,
    type=POSITIVE,
    default=DEFAULT_CLEANUP_INTERVAL,
    show_default=True,
    help="Seconds between cleanup passes.",
)
@click.option(
    "--four-eyes/--no-four-eyes",
    envvar=ENV_FOUR_EYES,
    show_envvar=True,
    default=False,
    show_default=True,
    help="Refuse (403) a token confirming a command it enqueued itself.",
)
@settings_options(connect_timeout=SERVE_CONNECT_TIMEOUT, log_level="info")
def serve(
    bind: str,
    tokens: str,
    cleanup_interval: float,
    four_eyes: bool,
    log_level: str,
    **options: Any,
) -> None:
    """Run the sidecar: HTTP API, outbox relay, periodic cleanup.

    Stops gracefully on SIGTERM or Ctrl-C: in-flight requests finish, then the store
    flushes and closes. The OpenAPI document is at /openapi.json.
    """
    # The service's log keeps the broker client's warnings (a blocked connection, say).
    logging_to_stderr(log_level, quiet_broker_client=False)
    try:
        host, port = parse_bind(bind)
        settings = settings_from(
            options,
            host=host,
            port=port,
            tokens=Tokens.parse(tokens),
            cleanup_interval=cleanup_interval,
            four_eyes=four_eyes,
        )
    except (TokenConfigError, ValueError) as exc:
        fail(str(exc), EXIT_INVALID)
    # Imported here: the web stack costs every other verb's start-up about 0.1 s.
    from amqp_queue.service import serve as serve_forever

    try:
        # uvloop, as uvicorn's "standard" install runs: the same service answered 1.4 to
        # 1.8 times the requests per second on it (bench: api), nothing else changed.
        # Not installed on Windows: asyncio's own loop there.
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve_forever(settings))
        else:
            uvloop.run(serve_forever(settings))
    except QueueError as exc:
        fail(str(exc), exit_code(exc))
    except OSError as exc:
        fail(f"cannot listen on {bind}: {exc}")


@click.command(epilog=EPILOG)
@click.option("--devices", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=12.0,
    show_default=True,
    help="How long commands are sent; the run takes a few seconds more.",
)
@click.option("--seed", type=int, help="Makes the random choices repeatable.")
@amqp_url_option
@click.option("--state-url", help="The state index [default: a temporary SQLite file].")
@connect_timeout_option(VERB_CONNECT_TIMEOUT)
@log_level_option("warning")
@json_option
# Its exchange is its own, named for the run, so it never meets another's queues.
@knob_options(leaving_out={"exchange"})
def demo(
    devices: int,
    seconds: float,
    seed: int | None,
    amqp_url: str,
    state_url: str | None,
    connect_timeout: float,
    log_level: str,
    as_json: bool,
    **knobs: Any,
) -> None:
    """Run simulated devices over the broker; check what they got.

    Exits non-zero unless nothing was lost and nothing was delivered twice.
    """
    from amqp_queue.demo import DemoOptions, run_demo, table  # as serve's, when run

    try:
        options = DemoOptions(
            devices=devices,
            seconds=seconds,
            seed=seed,
            amqp_url=amqp_url,
            state_url=state_url,
            connect_timeout=connect_timeout,
            rabbitmq=rabbitmq_from(knobs),
        )
    except ValueError as exc:  # a limit below what the demo's own commands need
        raise click.UsageError(str(exc)) from exc
    logging_to_stderr(log_level, quiet_broker_client=True)
    out = sys.stderr if as_json else sys.stdout
    try:
        summary = asyncio.run(run_demo(options, out, sys.stderr))
    except QueueError as exc:
        fail(str(exc), exit_code(exc))
    if as_json:
        data = {label: value for label, value in summary.rows()}
        emit(True, {**data, "ok": summary.ok, "violations": summary.violations}, "")
    else:
        click.echo(table(summary))
    if not summary.ok:
        sys.exit(EXIT_FAILED)
