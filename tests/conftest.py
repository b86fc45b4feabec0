from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from amqp_queue.state import IndexedStore, Store
from tests.backends import BACKENDS, INDEX_BACKENDS, indexed_store
from tests.file_order import longest_first
from tests.quick_backends import deselect_left_out
from tests.support import FakeClock

OpenStore = Callable[..., AbstractAsyncContextManager[Store]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    deselect_left_out(config, items)
    longest_first(items)


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
