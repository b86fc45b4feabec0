"""Server-side faults through rabbitmqctl: closing named connections, restarting the broker app."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time

RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"


def rabbitmqctl(*args: str, timeout: float = 120.0) -> str:
    return subprocess.run(
        [RABBITMQCTL, *args], capture_output=True, text=True, check=True, timeout=timeout
    ).stdout


def close_connections_named(*names: str) -> int:
    """Closes, server side, the connections whose client gave one of these names."""
    listing = rabbitmqctl("-q", "list_connections", "pid", "client_properties")
    pids = [
        line.split("\t", 1)[0]
        for line in listing.splitlines()
        if any(name in line for name in names)
    ]
    for pid in pids:
        # It may have closed by itself in the meantime.
        with contextlib.suppress(subprocess.CalledProcessError):
            rabbitmqctl("close_connection", pid, "reliability harness fault")
    return len(pids)


def restart_broker_app(down_for: float) -> None:
    """Stops the broker application (every client loses its connection), starts it again
    ``down_for`` seconds later and waits until it is fully up."""
    rabbitmqctl("stop_app")
    try:
        time.sleep(down_for)
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")
