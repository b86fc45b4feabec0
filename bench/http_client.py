"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for driving the operator API.

An HTTP library in the benchmark's process would spend more CPU per request than the
server does on a two-core machine and so measure itself; this one writes each request in
one write and reads the response by its ``Content-Length`` (every response of the API has
one), on one connection kept open for all of its requests.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self


class HttpError(Exception):
    """The server answered in a way this client does not read, or closed the connection."""


class KeepAliveClient:
    """One persistent connection; requests on it run one after the other."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self._host, self._port = host, port
        self._auth = f"Authorization: Bearer {token}\r\n"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Self:
        self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """The response's status and body."""
        if self._reader is None or self._writer is None:
            raise HttpError("not connected")
        head = f"{method} {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n{self._auth}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + (body or b""))
        status_line = await self._reader.readline()
        parts = status_line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise HttpError(f"no status line: {status_line!r}")
        length: int | None = None
        while True:
            line = await self._reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise HttpError(f"{method} {path}: response without Content-Length")
        return int(parts[1]), await self._reader.readexactly(length)
