"""Test files in the order pytest-xdist hands them out: the longest first.

``--dist loadfile`` gives each worker whole files, in collection order, as it finishes the
last: a long file that comes late holds the run open while the other workers idle. Handed out
longest first (the longest-processing-time rule), what comes last is short. The weights are
each file's seconds in a recorded run, ``tests/file_seconds.json``; a file not recorded
weighs the median. ``python -m tests.file_order JUNIT_XML`` writes them from a run's
``--junitxml`` (``-o junit_family=xunit1``, which names each case's file).
"""

from __future__ import annotations

import json
import statistics
import sys
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import Path

import pytest

WEIGHTS = Path(__file__).with_name("file_seconds.json")


def longest_first(items: list[pytest.Item]) -> None:
    """Reorders ``items`` by file, the heaviest file first; each file's own order stays."""
    weights: dict[str, float] = json.loads(WEIGHTS.read_text()) if WEIGHTS.exists() else {}
    if not weights:
        return
    default = statistics.median(weights.values())
    files: dict[str, list[pytest.Item]] = defaultdict(list)
    for item in items:
        files[item.nodeid.split("::", 1)[0]].append(item)
    order = sorted(files, key=lambda name: weights.get(name, default), reverse=True)
    items[:] = [item for name in order for item in files[name]]


def seconds_per_file(junit_xml: Path) -> dict[str, float]:
    """Each file's seconds (its cases' times summed) in a JUnit report."""
    seconds: dict[str, float] = defaultdict(float)
    for case in ElementTree.parse(junit_xml).iter("testcase"):
        name = case.get("file")
        if name:
            seconds[name] += float(case.get("time") or 0.0)
    if not seconds:
        raise SystemExit(f"{junit_xml} names no case's file: run with -o junit_family=xunit1")
    return {name: round(total, 1) for name, total in sorted(seconds.items())}


if __name__ == "__main__":
    written = WEIGHTS.with_suffix(".tmp")
    written.write_text(json.dumps(seconds_per_file(Path(sys.argv[1])), indent=1) + "\n")
    written.replace(WEIGHTS)  # whole, for a run collecting meanwhile
