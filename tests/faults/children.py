"""Child processes of the harness: started, watched line by line, killed with SIGKILL."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.faults.workload import READY

ROOT = Path(__file__).resolve().parents[2]


class Child:
    """A ``python -m <module>`` child whose stdout lines are collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self.lines: list[str] = []
        self._ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self._stderr = asyncio.create_task(self._read_stderr())
        self.stderr = ""

    @classmethod
    async def start(cls, module: str, *args: str, stdin: bool = False) -> Child:
        """``stdin``: keep a pipe to the child's standard input open for :meth:`send`."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self._process.stdout is not None
        async for raw in self._process.stdout:
            line = raw.decode(errors="replace")
            if not line.endswith("\n"):
                continue  # cut short by the kill
            if line.strip() == READY:
                self._ready.set()
            self.lines.append(line)

    async def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        self.stderr = (await self._process.stderr.read()).decode(errors="replace")

    async def ready(self) -> None:
        """Waits until the child says it is ready (bound it with a timeout); raises if the
        child exited first."""
        waiter = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait({waiter, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self._ready.is_set():
            await self.kill()
            raise RuntimeError(f"the child exited before it was ready:\n{self.stderr[-3000:]}")

    async def send(self, line: str) -> None:
        """Writes one line to the child's standard input (started with ``stdin=True``)."""
        assert self._process.stdin is not None
        self._process.stdin.write(line.encode() + b"\n")
        await self._process.stdin.drain()

    async def wait(self) -> int:
        """Waits until the child exits by itself; its exit code."""
        code = await self._process.wait()
        await asyncio.gather(self._reader, self._stderr)
        return code

    async def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the child."""
        if self._process.returncode is None:
            self._process.kill()
        await self._process.wait()
        await asyncio.gather(self._reader, self._stderr)

    @property
    def died_by_itself(self) -> bool:
        """It exited before the kill (a crash of its own: see ``stderr``)."""
        return self._process.returncode is not None and self._process.returncode >= 0
