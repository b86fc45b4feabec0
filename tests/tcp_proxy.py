"""A loopback TCP proxy that simulates network loss between a client and the local broker.

Tests point a client at ``proxy.amqp_url`` instead of the broker. ``cut()`` drops every
connection through the proxy at once, the way a dead link or a crashed NAT box would, and keeps
dropping new ones until ``restore()``. The broker itself is never touched, so only the clients
behind the proxy see the outage.

Only 127.0.0.1 is ever listened on or connected to: the proxy cannot be pointed elsewhere.
:class:`StallProxy` can also stall its links (every byte held, no reset), as a dead peer does
before TCP gives up; :class:`LosesAnswer` can drop the one reply to a request the server ran
(an answer lost after a commit).

Why not a maintained one: aiomisc's ``TCPProxy`` (what aio-pika's own suite uses) and
toxiproxy were the candidates. aiomisc 18 ships ``TCPProxy`` inside ``aiomisc.pytest``, the
module of aiomisc's own pytest hooks and event-loop fixture (the test runner this suite would
then share with pytest-asyncio), and it has no refusing mode: it can drop every connection
(``disconnect_all``) or slow them down, but not refuse new ones until a restore, which an
outage needs (a robust connection's reconnects must fail while the link is down). toxiproxy
has that, but its server is a binary, and nothing here downloads one at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

LOOPBACK = "127.0.0.1"
BROKER_PORT = 5672
CHUNK_SIZE = 64 * 1024


class _Link:
    """One proxied connection: the accepted client socket and its upstream twin."""

    __slots__ = ("client", "upstream")

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream

    def abort(self) -> None:
        # abort(), not close(): queued bytes are discarded and the peer sees the socket die.
        self.client.transport.abort()
        self.upstream.transport.abort()

    def close(self) -> None:
        self.client.close()
        self.upstream.close()

    async def wait_closed(self) -> None:
        await _wait_closed(self.client)
        await _wait_closed(self.upstream)


async def _wait_closed(writer: asyncio.StreamWriter) -> None:
    # The socket is gone either way; a reset seen while closing is the expected outcome of a cut.
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copies bytes one way until EOF or a socket error; drain() bounds what is buffered."""
    with contextlib.suppress(OSError):
        while chunk := await reader.read(CHUNK_SIZE):
            writer.write(chunk)
            await writer.drain()


class TCPProxy:
    """An asyncio TCP proxy from an ephemeral loopback port to a loopback target port.

    Args:
        target_port: the port on 127.0.0.1 to forward to (the local broker by default).
        max_connections: connections proxied at once; more are dropped on accept.
        connect_timeout: seconds to wait for the target to accept an upstream connection.
        close_timeout: seconds ``cut()`` and ``close()`` wait for connection handlers to end.

    Usage::

        async with TCPProxy() as proxy:
            connection = await aio_pika.connect(proxy.amqp_url)
            await proxy.cut()      # the client's connection dies; new ones are dropped
            await proxy.restore()  # connections are accepted again
    """

    def __init__(
        self,
        target_port: int = BROKER_PORT,
        *,
        max_connections: int = 64,
        connect_timeout: float = 5.0,
        close_timeout: float = 5.0,
    ) -> None:
        if not 0 < target_port < 65536:
            raise ValueError(f"target_port {target_port} is not a TCP port")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not (connect_timeout > 0 and close_timeout > 0):
            raise ValueError("timeouts must be positive")
        self.target_port = target_port
        self.port = 0
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._cut = False
        self._closing = False
        # Bumped by every cut(), so a connection that was being set up while the cut happened
        # is dropped even if restore() came before its upstream connect finished.
        self._epoch = 0
        self.dropped = 0
        """Connections dropped on accept (while cut, or over ``max_connections``)."""

    @property
    def amqp_url(self) -> str:
        """The broker URL as seen through the proxy (guest credentials, default vhost)."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/"

    @property
    def is_cut(self) -> bool:
        """True between ``cut()`` and ``restore()``."""
        return self._cut

    @property
    def connection_count(self) -> int:
        """Connections currently proxied."""
        return len(self._links)

    async def start(self) -> None:
        """Starts listening on an ephemeral port of 127.0.0.1 and sets ``port``."""
        if self._server is not None:
            raise RuntimeError("the proxy is already started")
        self._closing = False
        self._server = await asyncio.start_server(self._serve, host=LOOPBACK, port=0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Drops every open connection at once and drops new ones until ``restore()``."""
        self._cut = True
        self._epoch += 1
        await self._drop_all()

    async def restore(self) -> None:
        """Accepts and forwards new connections again."""
        self._cut = False

    async def close(self) -> None:
        """Stops listening, drops every connection and waits for their handlers to end."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        server.close()
        # Let handlers of connections accepted just before close() start, see _closing and end.
        await asyncio.sleep(0)
        await self._drop_all()
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _drop_all(self) -> None:
        for link in tuple(self._links):
            link.abort()
        handlers = tuple(self._handlers)
        if handlers:
            await asyncio.wait(handlers, timeout=self._close_timeout)

    def _link_of(self, writer: asyncio.StreamWriter) -> _Link | None:
        return next((k for k in self._links if writer in (k.client, k.upstream)), None)

    def _refusing(self, epoch: int) -> bool:
        return self._cut or self._closing or epoch != self._epoch

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # start_server runs every handler in its own task
        self._handlers.add(task)
        try:
            await self._forward(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Carries what the client sends to the server (a subclass may hold it back)."""
        await _pipe(reader, writer)

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Carries what the server sends to the client (a subclass may hold it back)."""
        await _pipe(reader, writer)

    async def _forward(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        epoch = self._epoch
        if self._refusing(epoch) or len(self._links) >= self._max_connections:
            self.dropped += 1
            client.transport.abort()
            await _wait_closed(client)
            return
        try:
            upstream_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, self.target_port), self._connect_timeout
            )
        except (OSError, TimeoutError):
            client.transport.abort()
            await _wait_closed(client)
            return
        link = _Link(client, upstream)
        if self._refusing(epoch):
            link.abort()
            await link.wait_closed()
            return
        self._links.add(link)
        pipes = (
            asyncio.create_task(self._requests(client_reader, upstream)),
            asyncio.create_task(self._replies(upstream_reader, client)),
        )
        try:
            # Either side ending ends the link: AMQP has no use for a half-open socket.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._links.discard(link)
            link.close()
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            await link.wait_closed()


class StallProxy(TCPProxy):
    """A :class:`TCPProxy` whose links can also be stalled: while stalled, bytes are read
    from either side and held (not forwarded) until ``resume()``; a ``cut()`` still drops
    everything. A stall is what a dead link looks like before TCP gives up."""

    def __init__(self, target_port: int, **kwargs: Any) -> None:
        super().__init__(target_port, **kwargs)
        self._requests_flow = asyncio.Event()
        self._replies_flow = asyncio.Event()
        self._requests_flow.set()
        self._replies_flow.set()

    def stall(self, *, replies_only: bool = False) -> None:
        """Holds what the server sends (and, unless ``replies_only``, what the client
        sends): with replies only held, the server runs what it gets (a COMMIT lands) while
        its answer never reaches the client."""
        self._replies_flow.clear()
        if not replies_only:
            self._requests_flow.clear()

    def resume(self) -> None:
        self._requests_flow.set()
        self._replies_flow.set()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gate: asyncio.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(CHUNK_SIZE):
                await gate.wait()
                writer.write(chunk)
                await writer.drain()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._pipe(reader, writer, self._requests_flow)

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._pipe(reader, writer, self._replies_flow)


class LosesAnswer(TCPProxy):
    """A :class:`TCPProxy` that loses one answer once armed (:meth:`arm`): on the first link whose
    requests carry each of ``steps`` in turn (a script's SHA; a statement, then its
    ``COMMIT``), the server runs the last one, but its reply never reaches the client: the
    link dies as it arrives, as when the server went down, or the link was cut, between
    running a request and answering it. ``lost`` is set then."""

    def __init__(self, target_port: int, **kwargs: Any) -> None:
        super().__init__(target_port, **kwargs)
        self._steps: tuple[bytes, ...] = ()
        self._on_loss: Callable[[], Awaitable[None]] | None = None
        self._progress: dict[_Link, int] = {}
        self._doomed: _Link | None = None
        self.lost = asyncio.Event()

    def arm(self, *steps: bytes, on_loss: Callable[[], Awaitable[None]] | None = None) -> None:
        """Loses the reply to the last of ``steps``; ``on_loss`` (say, the server killed) is
        awaited once that reply reached the proxy, before the client's link dies."""
        if not steps:
            raise ValueError("arm() needs at least one step")
        self._steps, self._on_loss = steps, on_loss
        self._progress.clear()
        self._doomed = None
        self.lost.clear()

    def _advance(self, link: _Link | None, chunk: bytes) -> None:
        if link is None or not self._steps or self._doomed is not None or self.lost.is_set():
            return
        done, at = self._progress.get(link, 0), 0
        while done < len(self._steps) and (found := chunk.find(self._steps[done], at)) >= 0:
            done, at = done + 1, found + len(self._steps[done])
        self._progress[link] = done
        if done == len(self._steps):
            self._doomed = link  # the reply to this chunk (the client waits for it) is lost

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = self._link_of(writer)
        with contextlib.suppress(OSError):
            while chunk := await reader.read(CHUNK_SIZE):
                self._advance(link, chunk)
                writer.write(chunk)
                await writer.drain()

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = self._link_of(writer)
        with contextlib.suppress(OSError):
            while chunk := await reader.read(CHUNK_SIZE):
                if link is not None and link is self._doomed:
                    self._doomed = None
                    if self._on_loss is not None:
                        await self._on_loss()
                    self.lost.set()
                    link.abort()
                    return
                writer.write(chunk)
                await writer.drain()


class LosesRequest(TCPProxy):
    """A :class:`TCPProxy` that loses one request once armed (:meth:`arm`): the first chunk a
    client sends carrying ``step`` never reaches the server; the link is held for ``hold``
    seconds (the client waits for its reply) and then dies, as when the link was cut before
    the request arrived. ``lost`` is set once the link died."""

    def __init__(self, target_port: int, **kwargs: Any) -> None:
        super().__init__(target_port, **kwargs)
        self._step: bytes | None = None
        self._hold = 0.0
        self.lost = asyncio.Event()

    def arm(self, step: bytes, *, hold: float) -> None:
        self._step, self._hold = step, hold
        self.lost.clear()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = self._link_of(writer)
        with contextlib.suppress(OSError):
            while chunk := await reader.read(CHUNK_SIZE):
                if link is not None and self._step is not None and self._step in chunk:
                    self._step = None
                    await asyncio.sleep(self._hold)
                    link.abort()
                    self.lost.set()
                    return
                writer.write(chunk)
                await writer.drain()
