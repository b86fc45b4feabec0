"""The API's listening socket: accepted connections must send small responses at once."""

from __future__ import annotations

import asyncio
import socket

from amqp_queue.service import _bind


async def test_accepted_connections_have_tcp_nodelay() -> None:
    # What asyncio does with the socket serve() binds: it sets TCP_NODELAY on accepted
    # connections only when the listening socket's protocol is TCP.
    listening = _bind("127.0.0.1", 0)
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=listening)
    try:
        port = listening.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(accepted, 5) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
