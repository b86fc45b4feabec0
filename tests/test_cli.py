"""The ``amqp-queue`` CLI through a subprocess: exit codes, --json, stderr, the real broker."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from amqp_queue import CommandStatus, RabbitMQConfig, RabbitMQStore
from amqp_queue.cli import cli as main_group
from amqp_queue.state.clock import Clock, utc_now
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.support import FakeClock, unique

ROOT = Path(__file__).resolve().parent.parent

CLI = [sys.executable, "-m", "amqp_queue.cli"]
# Nothing listens there: connecting is refused at once.
NO_BROKER = "amqp://guest:s3cret@127.0.0.1:1/"
# Generous: a verb that needs the broker gives up after --connect-timeout, 5 s by default.
GIVE_UP_WITHIN = 15


class Cli:
    """Runs the CLI against one exchange and SQLite file, given as environment variables."""

    def __init__(self, tmp_path: Path) -> None:
        self.exchange = unique("test.cli.")
        self.state_url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
        self.env = {
            **os.environ,
            "AMQP_URL": AMQP_URL,
            "AMQP_QUEUE_STATE_URL": self.state_url,
            "AMQP_QUEUE_EXCHANGE": self.exchange,
        }

    def run(self, *args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args],
            env={**self.env, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def json(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    async def store(self, clock: Clock = utc_now) -> RabbitMQStore:
        return await RabbitMQStore.connect(
            AMQP_URL,
            state_url=self.state_url,
            config=RabbitMQConfig(exchange=self.exchange),
            clock=clock,
        )


@contextmanager
def logging_as_it_was() -> Iterator[None]:
    """Undoes what a verb run in this process did to logging (its handler and levels)."""
    loggers = [logging.getLogger(name) for name in ("", "aiormq", "aio_pika")]
    saved = [(logger, logger.level, list(logger.handlers)) for logger in loggers]
    try:
        yield
    finally:
        for logger, level, handlers in saved:
            logger.setLevel(level)
            logger.handlers[:] = handlers


@pytest.fixture
async def cli(tmp_path: Path) -> AsyncIterator[Cli]:
    runner = Cli(tmp_path)
    yield runner
    await delete_namespace(runner.exchange, ["gw-1", "gw-2"])


async def test_enqueue_list_confirm_drain_and_status_with_json(cli: Cli) -> None:
    plain = cli.json("enqueue", "gw-1", "reboot", "--ttl", "60")
    unlock = cli.json("enqueue", "gw-1", "door", "--mode", "confirm", "--type", "unlock")
    pending = cli.json("pending", "gw-1")
    waiting = cli.json("confirmations", "gw-1")

    confirmed = cli.json("confirm", unlock["id"])
    drained = cli.json("drain", "gw-1")

    assert (plain["status"], unlock["status"]) == ("pending", "awaiting_confirmation")
    assert [c["id"] for c in pending["commands"]] == [plain["id"], unlock["id"]]
    assert [c["id"] for c in waiting["commands"]] == [unlock["id"]]
    assert confirmed == {"id": unlock["id"], "status": "pending"}
    assert [(c["id"], c["payload"]) for c in drained["commands"]] == [
        (plain["id"], "reboot"),
        (unlock["id"], "door"),
    ]
    assert cli.json("status", plain["id"]) == {"id": plain["id"], "status": "delivered"}


async def test_plain_output_is_the_id_then_the_status(cli: Cli) -> None:
    enqueued = cli.run("enqueue", "gw-1", "AAEC", "--base64", "--mode", "latest", "--type", "x")
    command_id = enqueued.stdout.strip()

    cancelled = cli.run("cancel", command_id)
    status = cli.run("status", command_id)

    assert enqueued.returncode == 0
    assert cancelled.stdout.strip() == f"cancelled {command_id}"
    assert status.stdout.strip() == "cancelled"
    assert cli.json("cleanup") == {"expired": 0}


async def test_confirm_says_when_it_changed_nothing(cli: Cli) -> None:
    plain = cli.json("enqueue", "gw-1", "reboot")["id"]
    unlock = cli.json("enqueue", "gw-1", "door", "--mode", "confirm", "--type", "unlock")["id"]

    first = cli.run("confirm", unlock)
    again = cli.run("confirm", unlock)
    of_plain = cli.run("confirm", plain)

    assert first.stdout.strip() == f"confirmed {unlock}: pending"
    nothing = "pending (no confirmation needed; nothing changed)"
    assert again.stdout.strip() == f"{unlock}: {nothing}"
    assert of_plain.stdout.strip() == f"{plain}: {nothing}"
    assert (first.returncode, again.returncode, of_plain.returncode) == (0, 0, 0)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["status", "00000000-0000-0000-0000-000000000042"], 3, "not found"),
        (["cancel", "nonsense"], 3, "not a command id"),
        (["enqueue", "bad id", "x"], 2, "device id"),
        (["enqueue", "gw-1", "x", "--mode", "latest"], 2, "needs a command type"),
        (["enqueue", "gw-1", "x", "--ttl", "0"], 2, "ttl must be positive"),
        (["enqueue", "gw-1", "%%", "--base64"], 2, "not valid base64"),
        (["enqueue", "gw-1"], 2, "Missing argument"),
        (["pending", "gw-1", "--state-url", "nosuch://x"], 2, "no state backend"),
        (
            [
                "enqueue",
                "gw-1",
                "x",
                "--amqp-url",
                "amqp://x:y@127.0.0.1:1/",
                "--connect-timeout",
                ".3",
            ],
            1,
            "cannot connect to the broker at amqp://x:***@127.0.0.1:1/",
        ),
        (["enqueue", "gw-1", "too long", "--max-payload-bytes", "4"], 2, "over the limit of 4"),
        (["pending", "gw-123", "--max-device-id-length", "5"], 2, "over the limit of 5"),
        (["pending", "gw-1", "--prefetch", "0"], 2, "'--prefetch'"),
    ],
)
def test_errors_go_to_stderr_with_a_non_zero_exit_code(
    cli: Cli, args: list[str], code: int, message: str
) -> None:
    # In this process (click's runner): a subprocess per case spent its second starting
    # Python, and the error paths are the same code either way; the tests around this one
    # go through a subprocess.
    with logging_as_it_was():
        result = CliRunner().invoke(main_group, args, env=cli.env, prog_name="amqp-queue")

    assert result.exit_code == code, result.stderr
    assert message in result.stderr
    assert result.stdout == ""


async def test_commands_that_only_use_the_index_work_while_the_broker_is_down(cli: Cli) -> None:
    plain = cli.json("enqueue", "gw-1", "reboot")
    unlock = cli.json("enqueue", "gw-1", "door", "--mode", "confirm", "--type", "unlock")

    def offline(*args: str) -> Any:
        result = cli.run(*args, "--json", AMQP_URL=NO_BROKER, AMQP_QUEUE_CONNECT_TIMEOUT="30")
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        return json.loads(result.stdout)

    listed = offline("pending", "gw-1")
    waiting = offline("confirmations", "gw-1")
    cancelled = offline("cancel", plain["id"])
    status = offline("status", plain["id"])
    cleaned = offline("cleanup")

    assert [c["id"] for c in listed["commands"]] == [plain["id"], unlock["id"]]
    assert [c["id"] for c in waiting["commands"]] == [unlock["id"]]
    assert cancelled == {"id": plain["id"], "status": "cancelled"}
    assert status == {"id": plain["id"], "status": "cancelled"}
    assert cleaned == {"expired": 0}
    # Cancelled while its message sat in the queue: the message is dropped at delivery.
    assert [c["id"] for c in cli.json("drain", "gw-1")["commands"]] == []


@pytest.mark.parametrize(
    "args",
    [
        ["enqueue", "gw-1", "reboot"],
        ["confirm", "00000000-0000-0000-0000-000000000042"],
        ["drain", "gw-1"],
        ["consume", "gw-1"],
        ["demo", "--devices", "1", "--seconds", "1"],
    ],
    ids=lambda args: args[0],
)
def test_a_command_that_needs_the_broker_gives_up_soon_with_one_line(
    cli: Cli, args: list[str]
) -> None:
    # The default connect timeout once (enqueue); the other verbs take the same path, with
    # a second where the default gives it five.
    timeout = {} if args[0] == "enqueue" else {"AMQP_QUEUE_CONNECT_TIMEOUT": "1"}
    result = cli.run(*args, AMQP_URL=NO_BROKER, timeout=GIVE_UP_WITHIN, **timeout)

    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot connect to the broker at amqp://guest:***@127.0.0.1:1/" in lines[0]
    assert "s3cret" not in result.stderr + result.stdout


def test_a_port_that_never_answers_is_given_up_on_at_the_connect_timeout(cli: Cli) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        result = cli.run(
            *("drain", "gw-1", "--connect-timeout", "1"),
            AMQP_URL=f"amqp://guest:guest@127.0.0.1:{port}/",
            timeout=GIVE_UP_WITHIN,
        )

    [line] = result.stderr.splitlines()
    assert result.returncode == 1
    assert line.startswith(
        f"amqp-queue: error: cannot connect to the broker at amqp://guest:***@127.0.0.1:{port}/ "
        "within 1s"
    )
    assert "no answer in" in line


async def test_confirming_an_expired_command_exits_4(cli: Cli) -> None:
    # Written by a producer whose clock says an hour ago: expired by the CLI's clock.
    an_hour_ago = FakeClock(datetime.now(UTC) - timedelta(hours=1))
    async with await cli.store(an_hour_ago) as store:
        unlock = await store.enqueue_with_confirmation("gw-1", "u", b"door", 60)

    result = cli.run("confirm", unlock)

    assert result.returncode == 4
    assert "expired" in result.stderr


async def test_consume_prints_commands_as_they_arrive_until_ctrl_c(cli: Cli) -> None:
    process = await asyncio.create_subprocess_exec(
        *CLI, "consume", "gw-2", "--json", env=cli.env, stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        async with await cli.store() as store:
            first = await store.enqueue("gw-2", b"one", 60)
            second = await store.enqueue("gw-2", b"two", 60)
            async with asyncio.timeout(20):
                lines = [await process.stdout.readline() for _ in range(2)]
            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(20):
                code = await process.wait()
            statuses = [await store.get_status(first), await store.get_status(second)]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert [json.loads(line)["payload"] for line in lines] == ["one", "two"]
    assert code == 0
    assert statuses == [CommandStatus.DELIVERED, CommandStatus.DELIVERED]


def test_help_lists_every_command() -> None:
    result = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True)

    for command in (
        "enqueue",
        "pending",
        "confirmations",
        "status",
        "confirm",
        "cancel",
        "drain",
        "consume",
        "cleanup",
        "outcome",
        "rollout",
        "retire",
        "migrate",
        "serve",
        "demo",
    ):
        assert f"  {command} " in result.stdout
    assert "Exit codes" in result.stdout
