"""The benchmark report: a quick run gives no verdict on targets its tiny sizes cannot reach."""

from __future__ import annotations

from datetime import UTC, datetime

from bench.harness import Results, Target, percentile
from bench.report import Run, as_json, markdown


def _results() -> Results:
    results = Results()
    results.record("ours", 1.0, group="g", label="ours", unit="msg/s")
    results.record("raw", 2.0, group="g", label="raw", unit="msg/s")
    results.ratio("ours / raw", "ours", "raw", Target(0.7))
    return results


def _run(mode: str) -> Run:
    return Run(mode, 1, datetime(2026, 12, 2, tzinfo=UTC), 1.0, {"cpu": "test"})


def test_a_quick_run_marks_targets_not_applicable_instead_of_missed() -> None:
    report = markdown(_results(), _run("quick"))

    assert "| ours / raw | 0.50 | 0.50\u20130.50 | ≥ 0.7 | n/a (quick) |" in report
    assert "**no**" not in report
    assert as_json(_results(), _run("quick"))["ratios"][0]["met"] is None


def test_a_full_run_says_a_missed_target_is_missed() -> None:
    report = markdown(_results(), _run("full"))

    assert "| ours / raw | 0.50 | 0.50\u20130.50 | ≥ 0.7 | **no** |" in report
    assert as_json(_results(), _run("full"))["ratios"][0]["met"] is False


def test_percentiles_are_nearest_rank_of_the_samples() -> None:
    samples = [float(value) for value in range(100, 0, -1)]

    assert percentile(samples, 0.50) == 50.0
    assert percentile(samples, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0
