"""Writes the results as a markdown table and a JSON file, with the machine they ran on."""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import Figure, Results, Target

DASH = "\u2013"


@dataclass(frozen=True, slots=True)
class Run:
    """One invocation: its mode, when it ran, how long it took and on what."""

    mode: str
    runs: int
    started: datetime
    seconds: float
    machine: dict[str, str]


def machine() -> dict[str, str]:
    """The facts that make figures comparable: CPU, cores, memory, Python, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f"{pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _spread(values: list[float]) -> str:
    return f"{_number(min(values))}{DASH}{_number(max(values))}"


def _verdict(target: Target | None, median: float, mode: str) -> str:
    # A quick run's sizes are too small for a ratio to say anything about its target, and a
    # "no" there would alarm a reader of `make test` for nothing.
    if target is None:
        return ""
    if mode == "quick":
        return "n/a (quick)"
    return "yes" if target.met(median) else "**no**"


def markdown(results: Results, run: Run) -> str:
    lines = [
        f"Mode: {run.mode}, {run.runs} run(s) per figure; median (min{DASH}max) of the runs. "
        f"{run.started:%Y-%m-%d %H:%M} UTC, {run.seconds:.0f} s.",
        "Machine: " + ", ".join(f"{key} {value}" for key, value in run.machine.items()) + ".",
        "",
    ]
    groups: dict[str, list[Figure]] = {}
    for figure in results.figures.values():
        groups.setdefault(figure.group, []).append(figure)
    lines += [f"| benchmark | median | min{DASH}max | unit |", "| --- | ---: | ---: | --- |"]
    for group, figures in groups.items():
        lines.append(f"| **{group}** | | | |")
        for figure in figures:
            lines.append(
                f"| {figure.label} | {_number(figure.median)} | {_spread(figure.values)} "
                f"| {figure.unit} |"
            )
    lines += [
        "",
        f"| ratio (each run's own figures) | median | min{DASH}max | target | met |",
        "| --- | ---: | ---: | ---: | :---: |",
    ]
    for ratio in results.ratios:
        values = results.ratio_values(ratio)
        if not values:
            continue
        median = statistics.median(values)
        target = "" if ratio.target is None else str(ratio.target)
        met = _verdict(ratio.target, median, run.mode)
        lines.append(f"| {ratio.label} | {median:.2f} | {_spread(values)} | {target} | {met} |")
    if results.notes:
        lines += ["", *(f"- {note}" for note in results.notes)]
    if results.failures:
        lines += ["", "Failed benchmarks:", *(f"- {failure}" for failure in results.failures)]
    return "\n".join(lines) + "\n"


def as_json(results: Results, run: Run) -> dict[str, Any]:
    ratios = []
    for ratio in results.ratios:
        values = results.ratio_values(ratio)
        if not values:
            continue
        median = statistics.median(values)
        ratios.append(
            {
                "label": ratio.label,
                "numerator": ratio.numerator,
                "denominator": ratio.denominator,
                "values": values,
                "median": median,
                "min": min(values),
                "max": max(values),
                "target": None if ratio.target is None else str(ratio.target),
                "met": None
                if ratio.target is None or run.mode == "quick"
                else ratio.target.met(median),
            }
        )
    return {
        "mode": run.mode,
        "runs": run.runs,
        "started": run.started.isoformat(),
        "seconds": run.seconds,
        "machine": run.machine,
        "figures": [
            {
                "key": figure.key,
                "group": figure.group,
                "label": figure.label,
                "unit": figure.unit,
                "better": figure.better,
                "values": figure.values,
                "median": figure.median,
                "min": min(figure.values),
                "max": max(figure.values),
            }
            for figure in results.figures.values()
        ],
        "ratios": ratios,
        "notes": results.notes,
        "failures": results.failures,
    }


def write(results: Results, run: Run, directory: Path) -> tuple[Path, Path]:
    """Writes ``<mode>-<time>.md`` and ``.json`` and copies them to ``latest-<mode>.*``."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{run.mode}-{run.started:%Y%m%dT%H%M%S}"
    table = markdown(results, run)
    data = json.dumps(as_json(results, run), indent=2) + "\n"
    md_path, json_path = directory / f"{stem}.md", directory / f"{stem}.json"
    for path, text in ((md_path, table), (json_path, data)):
        path.write_text(text)
        (directory / f"latest-{run.mode}{path.suffix}").write_text(text)
    return md_path, json_path


def now() -> datetime:
    return datetime.now(UTC)
