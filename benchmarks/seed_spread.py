"""How far the seeds of a sweep spread: is a point's seed-averaged figure settled?

    python -m benchmarks.seed_spread docs/results/sim/*-16 [--strategy kv_aware]

For each sweep folder (`loadgen sweep` or `simulate --sweep` with several --seeds) and each load, over
the strategy's seeds: the relative standard deviation between seeds (how much one seed's run can
differ) and the relative standard error of their mean (how settled the averaged figure the sweep
table reads is) for TTFT p50, TTFT p99 and E2E p50, and the hit rate's standard deviation in points.
Issue #21 asks for enough seeds that the spread is under 5%; the last line counts the figures whose
standard error is.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

from kvblocks.cli import ArgumentParser
from loadgen.results import read_json

PROG = "python -m benchmarks.seed_spread"
METRICS = (("ttft", "p50"), ("ttft", "p99"), ("e2e", "p50"))
BAR = 0.05


def spread(values: list[float]) -> tuple[float, float]:
    """(relative standard deviation, relative standard error of the mean) of `values` (>= 2, mean > 0)."""
    mean = statistics.fmean(values)
    rsd = statistics.stdev(values) / mean if mean else 0.0
    return rsd, rsd / len(values) ** 0.5


def folder_rows(folder: Path, strategy: str) -> list[dict]:
    """One row per load of `folder` with every seed's summary of `strategy` read."""
    rows = []
    rate_dirs = sorted((folder / strategy).glob("rate-*"), key=lambda p: float(p.name[5:]))
    for rd in rate_dirs:
        seeds = [read_json(p) for p in sorted(rd.glob("seed-*/summary.json"))]
        if len(seeds) < 2:
            continue
        row = {"workload": folder.name, "load": rd.name[5:], "seeds": len(seeds)}
        for metric, q in METRICS:
            row[f"{metric}_{q}"] = spread([s["latency_emulated"][metric][q] for s in seeds])
        row["hit_sd_pt"] = statistics.stdev([s["hit_rate"] for s in seeds]) * 100
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="sweep folders (OUT of a sweep with several --seeds)")
    p.add_argument("--strategy", default="kv_aware", help="whose runs (default %(default)s)")
    ns = p.parse_args(argv)
    missing = [str(f) for f in ns.folders if not f.is_dir()]
    if missing:
        p.error(f"folders: not a directory: {', '.join(missing)}")
    rows = [r for f in ns.folders for r in folder_rows(f, ns.strategy)]
    if not rows:
        print(f"{PROG}: no load with 2 or more seeds of {ns.strategy} in the folders given", file=sys.stderr)
        return 1
    names = [f"{m} {q}" for m, q in METRICS]
    print(f"{ns.strategy}: between seeds, relative standard deviation / standard error of the mean")
    print("| sweep | load | seeds | " + " | ".join(names) + " | hit rate sd |")
    print("|---|---|---|" + "---|" * len(names) + "---|")
    settled = total = 0
    for r in rows:
        cells = []
        for m, q in METRICS:
            rsd, sem = r[f"{m}_{q}"]
            total += 1
            settled += sem < BAR
            cells.append(f"{rsd * 100:.0f}% / {sem * 100:.1f}%")
        print(f"| {r['workload']} | {r['load']} | {r['seeds']} | " + " | ".join(cells) + f" | {r['hit_sd_pt']:.1f} pt |")
    print(f"standard error under {BAR * 100:.0f}%: {settled} of {total} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
