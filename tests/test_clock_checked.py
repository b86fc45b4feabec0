"""A clock that does not tell UTC-aware time is refused when the store opens, on every
backend, rather than failing later as whatever the driver makes of a naive datetime."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from amqp_queue import Store
from tests.conftest import OpenStore


def naive() -> datetime:
    return datetime.now()


def not_utc() -> datetime:
    return datetime.now(timezone(timedelta(hours=2)))


@pytest.mark.parametrize("clock", [naive, "not a clock"], ids=["naive", "not-callable"])
async def test_a_clock_without_a_timezone_is_refused_at_open(
    open_store: OpenStore, clock: object
) -> None:
    with pytest.raises(ValueError, match="clock"):
        async with open_store(clock=clock):
            pass


async def test_an_aware_clock_in_another_zone_is_taken(open_store: OpenStore) -> None:
    store: Store
    async with open_store(clock=not_utc) as store:
        command_id = await store.enqueue("dev-1", b"x", 60)
        assert (await store.get_pending("dev-1"))[0].id == command_id
        expires_at = (await store.get_pending("dev-1"))[0].expires_at
        assert expires_at.utcoffset() == timedelta(0)
        assert expires_at > datetime.now(UTC)
