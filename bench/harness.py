"""Figures, ratios and sizes: what a benchmark records and how a run is summarised.

Every figure is measured once per run and summarised as the median of the runs with their
min-max. A ratio divides two figures of the *same* run (machines are noisy: absolute figures
drift between runs, ratios hold), and is summarised the same way.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

Better = Literal["higher", "lower"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    """How much work each benchmark does; ``quick`` only checks that everything still runs."""

    runs: int = 3
    seq_enqueue: int = 1_000
    conc_enqueue: int = 10_000
    producers: int = 1_000
    in_flight: int = 1_000
    devices: int = 10
    drain: int = 10_000
    prefetch: int = 1_000
    confirm: int = 1_000
    storm: int = 3_000
    storm_types: int = 4
    backend: int = 1_000
    alternatives: int = 1_000
    scale_devices: int = 10_000
    streams: int = 10_000
    index_small: int = 10_000
    index_large: int = 1_000_000
    index_calls: int = 100
    latency: int = 2_000
    storm_devices: int = 2_000
    storm_commands: int = 10
    api_requests: int = 2_000
    api_concurrency: int = 50
    decompose: int = 1_000
    fanout: int = 10_000
    rollout_summary: int = 100_000
    fleet_scale: tuple[int, int] = (10_000, 100_000)


FULL = Sizes()
QUICK = Sizes(
    runs=1,
    seq_enqueue=20,
    conc_enqueue=100,
    producers=20,
    in_flight=20,
    devices=2,
    drain=100,
    prefetch=20,
    confirm=20,
    storm=100,
    backend=20,
    alternatives=20,
    scale_devices=20,
    streams=30,
    index_small=200,
    index_large=2_000,
    index_calls=5,
    latency=20,
    storm_devices=20,
    storm_commands=3,
    api_requests=10,
    api_concurrency=5,
    decompose=20,
    fanout=20,
    rollout_summary=200,
    fleet_scale=(20, 100),
)


@dataclass(slots=True)
class Figure:
    """One measured quantity, one value per run."""

    key: str
    group: str
    label: str
    unit: str
    better: Better = "higher"
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)


@dataclass(frozen=True, slots=True)
class Target:
    """What a ratio must reach: ``>= bound`` when higher is better, else ``<= bound``."""

    bound: float
    better: Better = "higher"

    def met(self, value: float) -> bool:
        return value >= self.bound if self.better == "higher" else value <= self.bound

    def __str__(self) -> str:
        return f"{'≥' if self.better == 'higher' else '≤'} {self.bound:g}"


@dataclass(frozen=True, slots=True)
class Ratio:
    """``numerator / denominator`` of figures measured in the same run."""

    label: str
    numerator: str
    denominator: str
    target: Target | None = None


@dataclass(slots=True)
class Results:
    """Everything one invocation of the benchmarks measured."""

    figures: dict[str, Figure] = field(default_factory=dict)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def record(
        self,
        key: str,
        value: float,
        *,
        group: str,
        label: str,
        unit: str,
        better: Better = "higher",
    ) -> None:
        """Adds this run's value of a figure (declared on its first value)."""
        figure = self.figures.get(key)
        if figure is None:
            figure = self.figures[key] = Figure(key, group, label, unit, better)
        figure.values.append(value)

    def ratio(
        self, label: str, numerator: str, denominator: str, target: Target | None = None
    ) -> None:
        self.ratios.append(Ratio(label, numerator, denominator, target))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def ratio_values(self, ratio: Ratio) -> list[float]:
        """The ratio in each run that measured both figures."""
        top = self.figures.get(ratio.numerator)
        bottom = self.figures.get(ratio.denominator)
        if top is None or bottom is None:
            return []
        return [a / b for a, b in zip(top.values, bottom.values, strict=False) if b > 0]


@dataclass(frozen=True, slots=True)
class Context:
    """What every benchmark gets: the sizes, where to record, and whether this is a quick run."""

    sizes: Sizes
    results: Results
    quick: bool


Benchmark = Callable[[Context], Awaitable[None]]


async def timed(action: Awaitable[object]) -> float:
    """Seconds ``action`` took."""
    started = time.perf_counter()
    await action
    return time.perf_counter() - started


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def percentile(samples: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``samples`` (``fraction`` 0.99 for p99).

    A run's latencies are summarised by their percentiles, each recorded as a figure of
    its own: the report then gives the median of the runs' p50s and p99s.
    """
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]
