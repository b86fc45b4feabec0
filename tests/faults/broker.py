"""Server-side faults on the machine's broker through rabbitmqctl: closing named connections.

Restarting a broker is done on a private node only (tests/private_broker.py): a restart of the
machine's broker would drop every other client of it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess

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
