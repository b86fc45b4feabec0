"""``amqp-queue``: the command-line tool for operators, the sidecar service and the demo.

click rather than typer: uvicorn already depends on click, so the CLI adds no package, and
click's explicit decorators type-check cleanly under mypy --strict.

Every command talks to the state index directly, and to the broker only when it must
(``pending``, ``confirmations``, ``status``, ``cancel`` and ``cleanup`` never do), configured by
the same flags and environment variables as ``serve``. Errors go to stderr with a non-zero exit
code; ``--json`` prints machine-readable output on stdout.
"""

from __future__ import annotations

import click

from amqp_queue.cli.common import EPILOG
from amqp_queue.cli.fleet import outcome, retire, rollout
from amqp_queue.cli.operator import (
    cancel,
    cleanup,
    confirm,
    confirmations,
    consume,
    drain,
    enqueue,
    pending,
    status,
)
from amqp_queue.cli.runners import demo, serve
from amqp_queue.cli.schema import migrate


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Queue commands for devices that are offline; deliver them over RabbitMQ."""


def main() -> None:
    """The ``amqp-queue`` console script."""
    cli(prog_name="amqp-queue")


for _command in (
    enqueue,
    pending,
    confirmations,
    status,
    confirm,
    cancel,
    cleanup,
    drain,
    consume,
    outcome,
    rollout,
    retire,
    migrate,
    serve,
    demo,
):
    cli.add_command(_command)

__all__ = ["cli", "main"]
