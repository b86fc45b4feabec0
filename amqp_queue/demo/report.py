"""What the demo shows a person: a progress bar while it runs, a summary table at the end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TextIO

import click

from amqp_queue.demo.ledger import Summary


async def progress(seconds: float, status: Callable[[], str], out: TextIO) -> None:
    """Shows a bar filling over ``seconds`` with ``status()`` beside it, until cancelled.

    On a terminal the bar redraws in place; elsewhere click prints the label once.
    """
    steps = max(1, round(seconds * 10))
    with click.progressbar(
        range(steps),
        label="fleet running",
        file=out,
        show_eta=False,
        item_show_func=lambda _: status(),
    ) as bar:
        for _ in bar:
            await asyncio.sleep(seconds / steps)


def table(summary: Summary) -> str:
    """The summary as a two-column table, with a verdict line under it."""
    rows = summary.rows()
    width = max(len(label) for label, _ in rows)
    digits = max(len(str(value)) for _, value in rows)
    rule = f"+-{'-' * width}-+-{'-' * digits}-+"
    lines = [rule, *(f"| {label:<{width}} | {value:>{digits}} |" for label, value in rows), rule]
    if summary.ok:
        lines.append(
            f"OK: {summary.devices} devices in {summary.seconds:.1f}s; every command that "
            "should arrive arrived exactly once."
        )
    else:
        lines.append("FAILED: " + "; ".join(_problems(summary)))
    return "\n".join(lines)


def _problems(summary: Summary) -> list[str]:
    problems = []
    if summary.lost:
        problems.append(f"{summary.lost} lost")
    if summary.duplicates:
        problems.append(f"{summary.duplicates} delivered twice")
    problems += summary.violations[:10]
    return problems
