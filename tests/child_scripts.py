"""Child processes the adversarial rounds kill: a script run with ``python -c`` that reports
what it did as JSON lines on its stdout (``{"ev": "ready"}`` once its store is open)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


async def start_script(script: str, *args: str) -> tuple[Any, list[dict[str, Any]]]:
    """Starts ``script`` with ``args`` and returns once it said it is ready (or ended): the
    process (its ``reader`` task collects the events) and the events so far, growing."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    events: list[dict[str, Any]] = []
    ready = asyncio.Event()

    async def read() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            if not line.endswith(b"\n"):
                break  # cut off by the kill
            event = json.loads(line)
            if event["ev"] == "ready":
                ready.set()
            events.append(event)
        ready.set()

    proc.reader = asyncio.create_task(read())  # type: ignore[attr-defined]
    await asyncio.wait_for(ready.wait(), 20)
    return proc, events
