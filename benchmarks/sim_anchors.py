"""The anchors' tables: our simulated runs beside llm-d's and Dynamo's published figures.

    python -m benchmarks.sim_anchors b2b-saas docs/results/sim/anchor-b2b-saas
    python -m benchmarks.sim_anchors mooncake docs/results/sim/anchor-mooncake-8/speed-2 ...

Reads each strategy's records (written by `loadgen simulate`), adds what the summaries lack (TTFT p90 and
mean, goodput: requests per second that met the SLO, and their output tokens per second), writes FOLDER/
anchor.json and FOLDER/anchor.md, prints the table, then drops the records and plots (`--keep` keeps them)
so the results stay small in the repository. Strategies without records keep their figures from the
folder's anchor.json: a strategy rerun into the folder alone replaces its own row only. Published figures:
- llm-d, "KV-Cache Wins You Can See" and llm-d-kv-cache-manager benchmarking/73-capacity (summary across QPS):
  precise 0.542 s TTFT p90 / 0.298 s mean / 8,730.0 output tok/s; estimated (approximate prefix)
  31.083 / 13.316 / 6,944.4; load 94.865 / 46.987 / 4,266.4 (the blog's table prints 4,428.7, random's
  figure); random 92.551 / 45.281 / 4,428.7.
- Dynamo's KV router against round robin on the Mooncake tool-agent trace, 8 Qwen3-32B workers, 0.8x
  speed: 24.6x lower mean TTFT, 18.6x lower p99 TTFT.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from kvblocks.cli import ArgumentParser
from loadgen.results import read_json, read_records, write_json

PROG = "python -m benchmarks.sim_anchors"
# strategy -> (llm-d scheduler, TTFT p90 s, TTFT mean s, output tok/s)
LLM_D = {
    "kv_aware": ("precise-scheduling", 0.542, 0.298, 8730.0),
    "prefix": ("estimated (approximate prefix)", 31.083, 13.316, 6944.4),
    "least_loaded": ("load-scheduling", 94.865, 46.987, 4266.4),
    "random": ("random-scheduling", 92.551, 45.281, 4428.7),
}
DYNAMO = {"mean": 24.6, "p99": 18.6}
ORDER = ("kv_aware", "prefix", "round_robin", "least_loaded", "random", "sglang")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def measure(folder: Path, slo_ttft: float, slo_tpot: float) -> dict[str, Any]:
    """One strategy's anchor figures from its records and summary."""
    summary = read_json(folder / "summary.json")
    records = read_records(folder)
    ok = [r for r in records if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    good = [r for r in ok if r["ttft"] is not None and r["ttft"] <= slo_ttft and (r["tpot"] or 0.0) <= slo_tpot]
    span = summary["duration_emulated_s"] or math.nan
    return {
        "strategy": summary["strategy"], "requests": len(records), "ok": len(ok), "failed": len(records) - len(ok),
        "hit_rate": summary["hit_rate"], "ttft_mean": sum(ttft) / len(ttft) if ttft else math.nan,
        "ttft_p50": percentile(ttft, 50), "ttft_p90": percentile(ttft, 90), "ttft_p99": percentile(ttft, 99),
        "tpot_p50": percentile([r["tpot"] for r in ok if r["tpot"] is not None], 50),
        "duration_s": span, "output_tokens_per_s": sum(r["completion_tokens"] for r in ok) / span,
        "goodput_rps": len(good) / span, "goodput_share": len(good) / len(records) if records else math.nan,
        "goodput_output_tokens_per_s": sum(r["completion_tokens"] for r in good) / span,
    }


def collect(folder: Path, slo_ttft: float, slo_tpot: float) -> dict[str, Any]:
    """Figures of every strategy under `folder`: measured from records where there are some, else kept from
    the anchor.json written before (so one strategy can be rerun into the folder on its own)."""
    before = read_json(folder / "anchor.json") if (folder / "anchor.json").is_file() else {}
    rows = dict(before.get("strategies", {}))
    subs = sorted(p for p in folder.iterdir() if (p / "summary.json").is_file())
    measured = [sub for sub in subs if (sub / "records.jsonl").is_file()]
    for sub in measured:
        rows[sub.name] = measure(sub, slo_ttft, slo_tpot)
    one = read_json(subs[0] / "summary.json") if subs else {}
    slo = {"ttft_s": slo_ttft, "tpot_s": slo_tpot}
    return {"slo": slo if measured else before.get("slo", slo),
            "load": one.get("load", before.get("load", "")),
            "workload_params": one.get("workload_params", before.get("workload_params", {})),
            "notes": one.get("notes", before.get("notes", [])),
            "strategies": {k: rows[k] for k in sorted(rows, key=lambda n: ORDER.index(n) if n in ORDER else 99)}}


def _f(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def b2b_table(data: dict[str, Any]) -> list[str]:
    slo = data["slo"]
    lines = ["| strategy | TTFT p90 (s) | TTFT mean (s) | output tok/s | goodput (req/s) | hit rate | "
             "llm-d scheduler | llm-d TTFT p90 (s) | llm-d TTFT mean (s) | llm-d output tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in data["strategies"].items():
        pub = LLM_D.get(name)
        theirs = f"{pub[0]} | {pub[1]:.3f} | {pub[2]:.3f} | {pub[3]:,.1f}" if pub else "- | - | - | -"
        lines.append(f"| {name} | {_f(r['ttft_p90'])} | {_f(r['ttft_mean'])} | {_f(r['output_tokens_per_s'], 0)} | "
                     f"{_f(r['goodput_rps'], 2)} ({r['goodput_share']:.0%}) | {r['hit_rate']:.1%} | {theirs} |")
    lines.append(f"\ngoodput: requests per emulated second with TTFT <= {slo['ttft_s']:g} s and TPOT <= "
                 f"{slo['tpot_s']:g} s (share of all requests in brackets); failed requests count against it.")
    return lines


def mooncake_table(data: dict[str, Any]) -> list[str]:
    slo = data["slo"]
    rows = data["strategies"]
    rr = rows.get("round_robin")
    lines = ["| strategy | TTFT mean (s) | TTFT p99 (s) | round robin / this, mean | round robin / this, p99 | "
             "goodput (req/s) | failed (shed) | output tok/s | hit rate |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ratio_mean = rr["ttft_mean"] / r["ttft_mean"] if rr else math.nan
        ratio_p99 = rr["ttft_p99"] / r["ttft_p99"] if rr else math.nan
        lines.append(f"| {name} | {_f(r['ttft_mean'])} | {_f(r['ttft_p99'])} | {_f(ratio_mean, 2)}x | "
                     f"{_f(ratio_p99, 2)}x | {_f(r['goodput_rps'], 2)} ({r['goodput_share']:.0%}) | {r['failed']} | "
                     f"{_f(r['output_tokens_per_s'], 0)} | {r['hit_rate']:.1%} |")
    lines.append(f"\nDynamo's KV router against round robin (Mooncake tool-agent trace, 8 Qwen3-32B workers, 0.8x "
                 f"speed): {DYNAMO['mean']}x mean, {DYNAMO['p99']}x p99. goodput: requests per emulated second with "
                 f"TTFT <= {slo['ttft_s']:g} s and TPOT <= {slo['tpot_s']:g} s.")
    return lines


def drop_bulk(folder: Path) -> None:
    """Remove records and plots (the summaries and reports stay)."""
    for p in [*folder.glob("*.png"), *folder.glob("*/records.jsonl"), *folder.glob("*/records.csv"),
              *folder.glob("*/*.png"), *folder.glob("*/backend_metrics.csv")]:
        p.unlink()


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("anchor", choices=("b2b-saas", "mooncake"), help="which published table to set ours beside")
    p.add_argument("folders", nargs="+", help="`loadgen simulate` output folders (one per run)")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput: a request's TTFT limit, emulated s (default %(default)s)")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="goodput: a request's TPOT limit, emulated s (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep records and plots (default: drop them after measuring)")
    ns = p.parse_args(argv)
    for f in ns.folders:
        if not Path(f).is_dir():
            p.error(f"folders: {f} is not a folder")
    for f in map(Path, ns.folders):
        data = collect(f, ns.slo_ttft, ns.slo_tpot)
        table = b2b_table(data) if ns.anchor == "b2b-saas" else mooncake_table(data)
        write_json(f / "anchor.json", data)
        head = [f"# Anchor ({ns.anchor}): {f.name}", "", f"Load: {data['load']}", "",
                f"Workload: {data['workload_params']}", *(f"Note: {n}" for n in data["notes"]), ""]
        (f / "anchor.md").write_text("\n".join(head + table) + "\n")
        print(f"{f}:\n" + "\n".join(table) + "\n")
        if not ns.keep:
            drop_bulk(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
