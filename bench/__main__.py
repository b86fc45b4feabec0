"""``python -m bench [--quick] [--only NAME ...] [--profile NAME]``: run the benchmarks.

Exits non-zero when a benchmark crashed (a benchmark measures; it never fails on a time).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
import traceback
from pathlib import Path

from bench import (
    alternatives,
    backends,
    cluster,
    commands,
    decompose,
    fleet,
    fleet_scale,
    index,
    latency,
    operator_api,
    reconnect,
    scale,
    streams,
    throughput,
)
from bench.harness import FULL, QUICK, Benchmark, Context, Results
from bench.report import Run, machine, now, write

BENCHMARKS: dict[str, Benchmark] = {
    "enqueue": throughput.bench_enqueue,
    "delivery": throughput.bench_delivery,
    "confirm": commands.bench_confirm,
    "storm": commands.bench_storm,
    "backends": backends.bench_backends,
    "alternatives": alternatives.bench_alternatives,
    "scale": scale.bench_scale,
    "streams": streams.bench_streams,
    "index": index.bench_index,
    "latency": latency.bench_latency,
    "decompose": decompose.bench_decompose,
    "reconnect": reconnect.bench_reconnect,
    "api": operator_api.bench_api,
    "fleet": fleet.bench_fleet,
}

OPT_IN: dict[str, Benchmark] = {
    # Starts a local three-node cluster of its own (20-35 s): run with --only cluster.
    "cluster": cluster.bench_cluster,
    # 10,000 and then 100,000 devices on the machine's broker, several minutes.
    "fleet-scale": fleet_scale.bench_fleet_scale,
}

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run: a smoke test")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted({*BENCHMARKS, *OPT_IN}),
        help="run only these benchmarks (cluster runs only when named)",
    )
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, quick 1)")
    parser.add_argument(
        "--profile",
        choices=sorted(BENCHMARKS),
        help="run one benchmark under pyinstrument and write its profile to bench/results/",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results are written")
    return parser.parse_args(argv)


async def run_all(names: list[str], ctx: Context) -> None:
    for name in names:
        print(f"bench: {name} ...", flush=True)
        started = time.perf_counter()
        try:
            await {**BENCHMARKS, **OPT_IN}[name](ctx)
        except Exception as exc:
            ctx.results.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        print(f"bench: {name} took {time.perf_counter() - started:.1f} s", flush=True)


def profile(name: str, ctx: Context, out: Path) -> None:
    from pyinstrument import Profiler

    profiler = Profiler(async_mode="enabled")
    with profiler:
        asyncio.run(run_all([name], ctx))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-{name}.txt"
    path.write_text(profiler.output_text(show_all=False, color=False))
    (out / f"profile-{name}.html").write_text(profiler.output_html())
    print(f"bench: profile written to {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = QUICK if args.quick else FULL
    if args.runs:
        sizes = dataclasses.replace(sizes, runs=args.runs)
    ctx = Context(sizes=sizes, results=Results(), quick=args.quick)
    mode = "quick" if args.quick else "full"
    started, clock = now(), time.perf_counter()
    if args.profile:
        profile(args.profile, ctx, args.out)
        mode = f"profile-{args.profile}"
    else:
        asyncio.run(run_all(args.only or list(BENCHMARKS), ctx))
    run = Run(mode, sizes.runs, started, time.perf_counter() - clock, machine())
    md_path, _ = write(ctx.results, run, args.out)
    print(md_path.read_text())
    print(f"bench: wrote {md_path} and its .json")
    if ctx.results.failures:
        print("bench: FAILED: " + "; ".join(ctx.results.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
