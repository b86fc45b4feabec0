"""The test command's short form of the adversarial scenarios: each on one of the state
backends it is written for, the one kept turning from scenario to scenario.

The adversarial modules (``tests/test_adversarial_*.py``) run their scenarios on two or three
of SQLite, PostgreSQL and Redis state, and together they took about half of the suite's time.
On two backends each (the short form until the twenty-fifth session) the test command took 13
minutes on this machine, against the ten it has. In the short form every scenario runs on one
backend, and every backend meets its share of the scenarios written for it; ``make
reliability`` (``AMQP_QUEUE_FULL_MATRIX=1``) runs every combination. The one kept is picked by
a checksum of the scenario's own name and parameters, so every xdist worker, and a rerun of
one file, leaves out the same tests.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import pytest

from tests.support import FULL_MATRIX

ROTATED = ("sqlite", "postgres", "redis")
"""The backends a scenario turns between (in this order)."""

_BACKEND_PARAMS = ("env", "backend", "kind", "shared_env", "sql_env")
"""The parameter names the adversarial modules give their state backend."""


def _backend(item: pytest.Item) -> str | None:
    if not isinstance(item, pytest.Function) or not hasattr(item, "callspec"):
        return None
    for name in _BACKEND_PARAMS:
        value = item.callspec.params.get(name)
        if value in ROTATED:
            return str(value)
    return None


def _scenario(item: pytest.Function, backend: str) -> tuple[str, str]:
    """The test's module and name with every parameter but the backend."""
    others = ",".join(
        f"{name}={value!r}"
        for name, value in sorted(item.callspec.params.items())
        if value != backend or name not in _BACKEND_PARAMS
    )
    return item.nodeid.split("::", 1)[0], f"{item.originalname}[{others}]"


def left_out(items: Iterable[pytest.Item]) -> list[pytest.Item]:
    """The adversarial tests the short form does not run: for each scenario collected on two
    backends or more, all but the one its name picks (a checksum), so running one file or one
    test leaves out what the whole suite does."""
    backends: dict[tuple[str, str], dict[str, pytest.Item]] = {}
    for item in items:
        if not item.nodeid.startswith("tests/test_adversarial_"):
            continue
        if (backend := _backend(item)) is not None:
            assert isinstance(item, pytest.Function)
            backends.setdefault(_scenario(item, backend), {})[backend] = item
    out: list[pytest.Item] = []
    for scenario, on in backends.items():
        present = [backend for backend in ROTATED if backend in on]
        kept = present[zlib.crc32(repr(scenario).encode()) % len(present)]
        out += [item for backend, item in on.items() if backend != kept]
    return out


def deselect_left_out(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselects what :func:`left_out` names, unless the full matrix was asked for."""
    if FULL_MATRIX:
        return
    out = {id(item) for item in left_out(items)}
    if out:
        config.hook.pytest_deselected(items=[item for item in items if id(item) in out])
        items[:] = [item for item in items if id(item) not in out]
