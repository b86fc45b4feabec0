"""The sidecar service: the operator API, the outbox relay and a periodic cleanup, one process.

:func:`serve` runs until SIGTERM or SIGINT, then stops accepting connections, lets in-flight
requests finish (up to ``Settings.shutdown_timeout``), stops the cleanup loop and closes the
store, which flushes its batched index writes: every enqueue the API answered is in the
state index, and the outbox relay publishes what the broker had not confirmed on the next
start. The relay itself runs inside :class:`RabbitMQStore`.

:func:`running_api` runs the same API inside a caller's event loop on a socket it binds
(port 0 picks a free one): the demo and the tests use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Iterator

import uvicorn
from aio_pika.abc import AbstractRobustConnection

from amqp_queue.api import OperatorApi
from amqp_queue.channel_closing import close_channel
from amqp_queue.connection import connect_robust, connecting_robust
from amqp_queue.errors import BROKER_FAILURES
from amqp_queue.metrics import PrometheusObserver
from amqp_queue.settings import Settings
from amqp_queue.state.clock import Clock, utc_now
from amqp_queue.state.closing import Closing
from amqp_queue.state.errors import QueueError
from amqp_queue.state.factory import open_state
from amqp_queue.state.indexed_store import IndexedStore
from amqp_queue.store import RabbitMQStore

logger = logging.getLogger("amqp_queue.service")

# A UUID no command has: looking it up is a cheap read that proves the state answers.
_PROBE_ID = "00000000-0000-0000-0000-000000000000"
_HEALTH_TIMEOUT = 5.0
# aio-pika says "connection closed" with a bare RuntimeError.
_BROKER_DOWN: tuple[type[BaseException], ...] = (*BROKER_FAILURES, RuntimeError)


class Backends(Closing):
    """The broker connection, the state index and the store over them, opened together.

    The service owns the connection and the state (rather than letting
    :meth:`RabbitMQStore.connect` own them) so ``/healthz`` can check each.
    """

    def __init__(
        self,
        settings: Settings,
        connection: AbstractRobustConnection,
        state: IndexedStore,
        metrics: PrometheusObserver,
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.state = state
        self.metrics = metrics
        self.store = RabbitMQStore(connection, settings.rabbitmq, state=state, observer=metrics)
        self._connecting: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, settings: Settings, *, wait_for_broker: bool = False, clock: Clock = utc_now
    ) -> Backends:
        """Opens the state, connects to the broker and starts the store.

        Args:
            wait_for_broker: False (the sidecar): come up without the broker, as after a
                restart during an outage: /healthz names the broker as unreachable,
                enqueues go to the index, and the relay publishes them once the connection,
                trying in the background, is up. True (the demo): the broker must answer
                within ``connect_timeout`` seconds.
            clock: the index's time source (tests move it to expire commands).

        Raises:
            BrokerError: with ``wait_for_broker``, the broker could not be reached in time.
            StateError: the state index could not be opened.
        """
        config = settings.rabbitmq
        state = await open_state(settings.state_url, limits=config.limits, clock=clock)
        connecting: asyncio.Task[None] | None = None
        try:
            if wait_for_broker:
                connection = await connect_robust(settings.amqp_url, settings.connect_timeout)
            else:
                connection, connecting = connecting_robust(settings.amqp_url)
        except BaseException:
            await state.close()
            raise
        backends = cls(settings, connection, state, PrometheusObserver())
        backends._connecting = connecting
        try:
            await backends.store.start(wait_for_broker=wait_for_broker)
        except BaseException:
            await backends.close()
            raise
        return backends

    async def health(self) -> dict[str, str]:
        """``"ok"`` or what is wrong, for the broker and for the state index."""
        return {"broker": await self._check_broker(), "state": await self._check_state()}

    def api(self) -> OperatorApi:
        """The operator API over this store."""
        return OperatorApi(
            self.store,
            tokens=self.settings.tokens,
            metrics=self.metrics,
            health=self.health,
            max_body_bytes=self.settings.max_body_bytes,
            four_eyes=self.settings.four_eyes,
        )

    async def close(self) -> None:
        """Closes the store (flushing its index writes), then the connection and the state."""
        try:
            await self.store.close()
        finally:
            try:
                if self._connecting is not None:
                    self._connecting.cancel()
                    with contextlib.suppress(asyncio.CancelledError, *_BROKER_DOWN):
                        await self._connecting
                await self.connection.close()
            finally:
                await self.state.close()

    async def _check_broker(self) -> str:
        if self.connection.is_closed or not self.connection.connected.is_set():
            return "unreachable: not connected, reconnecting"
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT):
                channel = await self.connection.channel()
        except _BROKER_DOWN as exc:
            return f"unreachable: {type(exc).__name__}: {exc}"
        # Not cancelled half way (see close_channel): that would close the store's connection.
        await close_channel(channel, _HEALTH_TIMEOUT, "the health check's channel")
        return "ok"

    async def _check_state(self) -> str:
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT):
                await self.state.get(_PROBE_ID)
        except (QueueError, TimeoutError) as exc:
            return f"unreachable: {type(exc).__name__}: {exc}"
        return "ok"


async def cleanup_loop(store: RabbitMQStore, interval: float) -> None:
    """Runs ``store.cleanup()`` every ``interval`` seconds until cancelled; failures are logged."""
    while True:
        await asyncio.sleep(interval)
        try:
            expired = await store.cleanup()
        except QueueError as exc:
            logger.warning("cleanup failed, will retry in %gs: %s", interval, exc)
        else:
            logger.debug("cleanup: %d expired", expired)


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to its owner (tests, the demo, :func:`serve`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server(backends: Backends, sock: socket.socket, *, access_log: bool) -> _Server:
    config = uvicorn.Config(
        backends.api().app(),
        lifespan="off",
        log_config=None,
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=int(backends.settings.shutdown_timeout),
    )
    return _Server(config)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose protocol
    # says TCP. Without it Nagle's algorithm meets the client's delayed ACK and every
    # keep-alive response waits about 40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def running_api(
    backends: Backends, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serves the operator API in this event loop; yields its base URL (``http://host:port``)."""
    sock = _bind(host, port)
    server = _server(backends, sock, access_log=False)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task  # raises what stopped it
                raise RuntimeError("the API server stopped during start-up")
            await asyncio.sleep(0.01)
        bound_host, bound_port = sock.getsockname()[:2]
        yield f"http://{_url_host(bound_host)}:{bound_port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve(settings: Settings) -> None:
    """Runs the service until SIGTERM or SIGINT, then shuts down gracefully.

    Raises:
        QueueError: the broker or the state could not be opened at start-up.
        OSError: the API's address could not be bound.
    """
    if not settings.tokens:
        logger.warning(
            "no API tokens configured (AMQP_QUEUE_TOKENS): every operator endpoint answers "
            "401; /healthz and /metrics stay open"
        )
    async with await Backends.open(settings) as backends:
        sock = _bind(settings.host, settings.port)
        server = _server(backends, sock, access_log=True)
        loop = asyncio.get_running_loop()

        def stop(signame: str) -> None:
            # A second signal skips waiting for in-flight requests.
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True
            logger.info("%s received: shutting down", signame)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop, signum.name)
        cleanup = asyncio.create_task(cleanup_loop(backends.store, settings.cleanup_interval))
        logger.info(
            "serving the operator API on http://%s:%d (tokens: %s), exchange %s",
            _url_host(settings.host),
            sock.getsockname()[1],
            settings.tokens.describe() or "none",
            settings.exchange,
        )
        try:
            await server.serve(sockets=[sock])
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleanup
            sock.close()
        logger.info("API stopped; closing the store")
