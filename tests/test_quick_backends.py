"""The test command's short form of the adversarial scenarios (tests/quick_backends.py): every
scenario on one backend, each backend kept for its share of the scenarios written for it, the
same ones however the tests are collected, everything in the full run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("sqlite", "postgres", "redis")
BACKEND = re.compile(r"\b(sqlite|postgres|redis)\b")
DESELECTED = "deselected: "


def pytest_deselected(items: list[pytest.Item]) -> None:
    """This module is also the collecting subprocess's plugin (``-p``): it names what the
    short form left out."""
    for item in items:
        print(f"{DESELECTED}{item.nodeid}")


@cache  # a collection of every adversarial module takes seconds of CPU: once per setting
def _collected(full: bool, modules: tuple[str, ...] | None = None) -> tuple[set[str], set[str]]:
    """The adversarial tests (or ``modules``') collected and those deselected."""
    env = {**os.environ, "AMQP_QUEUE_FULL_MATRIX": "1" if full else "0"}
    if modules is None:
        modules = tuple(
            sorted(str(path.relative_to(ROOT)) for path in ROOT.glob("tests/test_adversarial_*"))
        )
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [*command, "-p", "tests.test_quick_backends", *modules],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    left_out = {line.removeprefix(DESELECTED) for line in lines if line.startswith(DESELECTED)}
    kept = {line for line in lines if "::" in line and not line.startswith(DESELECTED)}
    return kept, left_out


def _scenario(nodeid: str) -> tuple[str, str] | None:
    """The test with its backend as ``*``, and the backend; None without one."""
    name, _, params = nodeid.partition("[")
    if match := BACKEND.search(params):
        return f"{name}[{BACKEND.sub('*', params, count=1)}", match.group(1)
    return None


def test_each_scenario_runs_on_one_of_its_backends_and_the_one_kept_turns() -> None:
    kept, left_out = _collected(full=False)
    on: dict[str, set[str]] = {}
    for nodeid in kept | left_out:
        if (found := _scenario(nodeid)) is not None:
            on.setdefault(found[0], set()).add(found[1])
    rotated = {scenario: backends for scenario, backends in on.items() if len(backends) > 1}

    written: Counter[str] = Counter()
    turns: Counter[str] = Counter()
    for scenario, backends in rotated.items():
        [kept_on] = [b for b in backends if scenario.replace("*", b) not in left_out]
        turns[kept_on] += 1
        written.update(backends)
    assert len(rotated) > 100
    assert len(left_out) == sum(len(b) - 1 for b in rotated.values())  # nothing else left out
    # Each backend kept for its share (a checksum picks it: a fifth at least).
    for backend in BACKENDS:
        assert turns[backend] >= written[backend] / 5, (turns, written)


def test_one_file_collected_alone_leaves_out_what_the_whole_suite_does() -> None:
    _, whole = _collected(full=False)
    alone = "tests/test_adversarial_ninth.py"
    _, left_out = _collected(full=False, modules=(alone,))

    assert left_out
    assert left_out == {nodeid for nodeid in whole if nodeid.startswith(alone)}


def test_the_full_matrix_leaves_nothing_out() -> None:
    kept, left_out = _collected(full=True)

    assert left_out == set()
    assert len(kept) > 400
