"""``amqp-queue migrate``: the state index's schema, brought to a revision by hand."""

from __future__ import annotations

import asyncio

import click

from amqp_queue.cli.common import (
    EPILOG,
    EXIT_INVALID,
    emit,
    exit_code,
    fail,
    json_option,
    logging_to_stderr,
)
from amqp_queue.cli.options import state_url_option
from amqp_queue.state.errors import QueueError
from amqp_queue.state.factory import migrate_state
from amqp_queue.state.sql.schema_versions import HEAD


@click.command(epilog=EPILOG)
@state_url_option
@click.option(
    "--revision",
    default=HEAD,
    show_default=True,
    help="The schema revision to reach; an older one downgrades, for an older release.",
)
@json_option
def migrate(state_url: str, revision: str, as_json: bool) -> None:
    """Bring the state index's schema to this release's revision.

    Every command, serve included, upgrades it on its own when it opens the index; run this
    to upgrade ahead of a deploy, to see the revision, or with --revision to go back to the
    schema of an older release before running it. Prints the revision before and after.
    """
    logging_to_stderr("info", quiet_broker_client=True)  # each revision Alembic applies
    try:
        change = asyncio.run(migrate_state(state_url, revision))
    except QueueError as exc:
        fail(str(exc), exit_code(exc))
    except ValueError as exc:
        fail(str(exc), EXIT_INVALID)
    before = change.before or "none"
    emit(as_json, {"before": change.before, "after": change.after}, f"{before} -> {change.after}")
