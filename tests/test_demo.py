"""The demo (``amqp-queue demo``) with a small fleet: nothing lost, nothing twice."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


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
            "2.5",
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
