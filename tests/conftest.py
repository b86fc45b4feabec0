from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from amqp_queue.state import IndexedStore, Store
from tests.backends import BACKENDS, INDEX_BACKENDS, indexed_store
from tests.support import FakeClock

OpenStore = Callable[..., AbstractAsyncContextManager[Store]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=sorted(BACKENDS))
def open_store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> OpenStore:
    """Opens a store of the parametrised backend; options override the test clock."""
    factory = BACKENDS[request.param]

    def opener(**options: Any) -> AbstractAsyncContextManager[Store]:
        options.setdefault("clock", clock)
        return factory(tmp_path, **options)

    return opener


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[Store]:
    async with open_store() as opened:
        yield opened


@pytest.fixture(params=INDEX_BACKENDS)
async def indexed(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[IndexedStore]:
    """An index backend, as the RabbitMQ layer drives it (its primitives, not only the
    Store contract)."""
    async with indexed_store(request.param, tmp_path, clock=clock) as opened:
        yield opened


def pytest_collection_finish(session: pytest.Session) -> None:
    # The local cluster takes 20-30 s to start: begun now, it is up by the time its module
    # runs, instead of the whole run waiting for it.
    if any(item.path == _CLUSTER_FILE for item in session.items):
        import tests.test_cluster

        tests.test_cluster.start_in_background()


def pytest_sessionfinish(session: pytest.Session) -> None:
    # A run that ended before the cluster's module did (a failure with -x, Ctrl-C) still
    # removes the cluster it began.
    module = sys.modules.get(_CLUSTER)
    if module is not None:
        module.stop_if_started()


_CLUSTER = "tests.test_cluster"
_CLUSTER_FILE = Path(__file__).with_name("test_cluster.py")
