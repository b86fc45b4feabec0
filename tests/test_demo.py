"""The demo (``amqp-queue demo``) with a small fleet: nothing lost, nothing twice."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from amqp_queue.cli.common import EXIT_QUEUE_FULL


# The demo takes every knob of the store but the exchange (its own, named for the run).
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_small_fleet_loses_nothing_and_gets_nothing_twice(queue_type: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "amqp_queue.cli",
            "demo",
            "--devices",
            "6",
            "--seconds",
            "4",  # 2.5 confirmed nothing over HTTP once, on a loaded machine
            "--json",
            "--queue-type",
            queue_type,
        ],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["lost"] == 0
    assert summary["delivered twice"] == 0
    assert summary["rule violations"] == 0
    assert summary["ok"] is True
    assert summary["enqueued"] > 0
    assert f"({queue_type} queues)" in result.stderr
    # The console's address is shown while the run goes on (on stderr with --json).
    assert re.search(r"console: http://127\.0\.0\.1:\d+/ \(sign in with the token ", result.stderr)
    assert summary["delivered"] > 0
    assert summary["confirmed over HTTP"] > 0
    accounted = summary["delivered"] + summary["replaced (latest wins)"] + summary["expired (TTL)"]
    assert accounted == summary["enqueued"]


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "amqp_queue.cli", "demo", "--devices", "2", "--seconds", "1"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=50, check=False
    )


def test_a_limit_below_what_the_demos_commands_need_is_a_usage_error() -> None:
    result = _demo("--max-ttl", "60")

    assert result.returncode == 2
    assert "the demo needs --max-ttl of at least 120, got 60" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_limit_met_mid_run_ends_it_with_one_error_line() -> None:
    result = _demo("--max-pending-per-device", "1")

    assert result.returncode == EXIT_QUEUE_FULL
    [error] = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert error.startswith("amqp-queue: error: device 'demo-00")
    assert "already holds its limit of 1 open commands" in error
    assert "Traceback" not in result.stderr
