"""The fleet verbs of ``amqp-queue`` through a subprocess, over the real broker and SQLite:
outcomes, rollouts from a file or standard input, retiring a device, the limit's exit code."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest

from amqp_queue import CommandStatus, RabbitMQConfig
from amqp_queue.cli.common import EXIT_NOT_FOUND, EXIT_OUTCOME_REFUSED, EXIT_QUEUE_FULL
from tests.rabbitmq_support import AMQP_URL, delete_namespace
from tests.test_cli import CLI, ROOT, Cli

DEVICES = ["gw-1", "gw-2", "gw-3"]


@pytest.fixture
async def cli(tmp_path: Path) -> AsyncIterator[Cli]:
    runner = Cli(tmp_path)
    yield runner
    await delete_namespace(runner.exchange, DEVICES)


def run_with_input(cli: Cli, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env=cli.env,
        cwd=ROOT,
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_a_rollout_from_standard_input_is_confirmed_followed_and_cancelled(
    cli: Cli,
) -> None:
    listed = "# the east wing\n" + "\n".join(DEVICES) + "\n\n"
    created = as_json(
        run_with_input(
            cli, listed, "rollout", "create", "-", "fw-2.1", "--type", "fw", "--confirm", "--json"
        )
    )
    rollout_id = created["rollout_id"]

    assert len(created["command_ids"]) == 3
    waiting = cli.json("rollout", "status", rollout_id)
    assert (waiting["total"], waiting["counts"]["awaiting_confirmation"]) == (3, 3)
    assert cli.json("rollout", "confirm", rollout_id) == {"rollout_id": rollout_id, "confirmed": 3}
    async with await cli.store() as store:
        assert await store.drain_pending("gw-1") == [b"fw-2.1"]
    assert cli.json("rollout", "cancel", rollout_id) == {"rollout_id": rollout_id, "cancelled": 2}
    text = cli.run("rollout", "status", rollout_id)
    assert text.stdout.strip() == f"{rollout_id}: 3 commands: delivered 1, cancelled 2"


async def test_a_rollout_from_a_file_and_an_unknown_rollout(cli: Cli, tmp_path: Path) -> None:
    listing = tmp_path / "devices.txt"
    listing.write_text("gw-1\ngw-2\n")

    made = cli.run("rollout", "create", str(listing), "reboot", "--ttl", "60")
    unknown = cli.run("rollout", "status", "00000000-0000-0000-0000-000000000001")
    empty = run_with_input(cli, "\n# nobody\n", "rollout", "create", "-", "reboot")

    assert made.returncode == 0, made.stderr
    summary = cli.json("rollout", "status", made.stdout.strip())
    assert summary["counts"]["pending"] == 2
    assert unknown.returncode == EXIT_NOT_FOUND
    assert "rollout '00000000-0000-0000-0000-000000000001': not found" in unknown.stderr
    assert empty.returncode == 2
    assert "the device list is empty" in empty.stderr


async def test_an_enqueue_over_the_device_limit_exits_with_its_own_code(cli: Cli) -> None:
    first = cli.run("enqueue", "gw-1", "one", "--max-pending-per-device", "1")
    second = cli.run("enqueue", "gw-1", "two", AMQP_QUEUE_MAX_PENDING_PER_DEVICE="1")
    rollout = run_with_input(
        cli, "gw-2\ngw-1\n", "rollout", "create", "-", "x", "--max-pending-per-device", "1"
    )

    assert first.returncode == 0, first.stderr
    assert second.returncode == EXIT_QUEUE_FULL
    assert "limit of 1 open commands" in second.stderr
    assert rollout.returncode == EXIT_QUEUE_FULL
    assert cli.json("pending", "gw-2")["commands"] == []  # nothing written


async def test_outcomes_are_reported_and_a_refused_one_has_its_own_exit_code(cli: Cli) -> None:
    done = cli.json("enqueue", "gw-1", "open", "--outcome-timeout", "60")["id"]
    broken = cli.json("enqueue", "gw-1", "close")["id"]
    waiting = cli.json("enqueue", "gw-2", "later")["id"]
    async with await cli.store() as store:
        assert len(await store.drain_pending("gw-1")) == 2

    completed = cli.json("outcome", "complete", done, "ok: 3 s")
    again = cli.run("outcome", "complete", done, "ok: 3 s")
    failed = cli.run("outcome", "fail", broken, "motor stalled")
    other = cli.run("outcome", "fail", done, "late")
    early = cli.run("outcome", "complete", waiting)

    assert completed["status"] == "succeeded"
    assert completed["outcome"]["result"] == "ok: 3 s"
    assert again.returncode == 0
    assert (failed.returncode, failed.stdout.strip()) == (0, "failed")
    assert other.returncode == EXIT_OUTCOME_REFUSED
    assert "outcome refused" in other.stderr
    assert early.returncode == EXIT_OUTCOME_REFUSED
    async with await cli.store() as store:
        outcome = await store.get_outcome(broken)
        assert outcome is not None
        assert (outcome.status, outcome.reason) == (CommandStatus.FAILED, "motor stalled")
        assert await store.get_status(waiting) is CommandStatus.PENDING


async def test_retire_cancels_the_open_commands_and_deletes_the_queue(cli: Cli) -> None:
    ids = [cli.json("enqueue", "gw-3", payload)["id"] for payload in ("a", "b")]

    retired = cli.json("retire", "gw-3")

    assert retired == {"device_id": "gw-3", "cancelled": 2}
    assert [cli.json("status", command_id)["status"] for command_id in ids] == [
        "cancelled",
        "cancelled",
    ]
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        name = RabbitMQConfig(exchange=cli.exchange).queue_name("gw-3")
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(name, passive=True)
