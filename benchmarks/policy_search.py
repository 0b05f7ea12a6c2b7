"""Search kv_aware's tunables on the simulator, across workloads and fleet sizes, not by hand on one.

    python -m benchmarks.policy_search --fleets 4,16 --candidate now= \\
        --candidate short=kv_aware.hot_horizon_s=5,kv_aware.amortize=16

Every scenario (a workload at one load, scaled with the fleet as docs/results/run-sim-sweeps.sh
scales it) runs round robin and least loaded once, then kv_aware under each candidate setting.
It prints, per scenario and candidate, kv_aware's TTFT p50 / TTFT p99 / E2E p50 over the best of
round robin and least loaded (the issue's bar: <= 1.05 everywhere) and its hit rate, then each
candidate's worst ratio. Deterministic (virtual time): the same flags print the same table.
Results also go to OUT/search.json; baselines are cached in OUT so a new candidate costs only its
own runs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import zlib
import sys
from pathlib import Path

# name -> (flags, requests at 4 backends, load at 4 backends): one load per workload, the middle or
# upper point of docs/results/sweep-workloads.sh (the light-load rotating prefix at the 10 req/s).
SCENARIOS: dict[str, tuple[list[str], int, float]] = {
    "rotating": (["--workload", "rotating-prefix", "--output-tokens", "16"], 300, 10),
    "rag": (["--workload", "rag", "--documents", "{16K}", "--doc-tokens-min", "1000", "--doc-tokens-max", "4000"], 240, 8),
    "burst": (["--workload", "burst", "--burst-prefixes", "{4K}"], 240, 16),
    "sysprompt": (["--workload", "sysprompt", "--system-prompts", "{3K}"], 240, 16),
    "multiturn": (["--workload", "multiturn", "--turns", "4", "--think-time", "1"], 160, 4),
    "tenants": (["--workload", "tenants", "--tenants", "{24K}", "--tenant-tokens", "2000"], 144, 6),
    "mixed": (["--workload", "mixed", "--documents", "{16K}", "--turns", "4"], 160, 8),
    "trace": (["--workload", "trace", "--trace-max-output", "128"], 360, 1.5),
}
BASELINES = ("round_robin", "least_loaded")
KEYS = ("ttft_p50", "ttft_p99", "e2e_p50")


def scenario_flags(name: str, backends: int, scale_requests: float) -> list[str]:
    flags, requests, load = SCENARIOS[name]
    k = max(1, backends // 4)
    out = [f.replace("{16K}", str(16 * k)).replace("{4K}", str(4 * k)).replace("{3K}", str(3 * k))
           .replace("{24K}", str(24 * k)) for f in flags]
    n = int(requests * k * scale_requests)
    if name == "trace":  # the trace's load is a speed-up, not a rate
        out += ["--trace-speedup", f"{load * k:g}"]
    else:
        out += ["--rate", f"{load * k:g}"]
    return out + ["--requests", str(n), "--backends", str(backends)]


def figures(summary: dict) -> dict:
    lat = summary.get("latency", summary)
    def get(metric: str, q: str):
        m = lat.get(metric) or {}
        return m.get(q)
    return {"ttft_p50": get("ttft", "p50"), "ttft_p99": get("ttft", "p99"), "e2e_p50": get("e2e", "p50"),
            "hit_rate": summary.get("hit_rate"), "errors": summary.get("errors")}


def simulate(py: str, out: Path, flags: list[str], strategies: str, params: list[str], seed: int) -> dict[str, dict]:
    cmd = [py, "-m", "loadgen", "simulate", *flags, "--strategies", strategies, "--seed", str(seed), "--out", str(out)]
    for p in params:
        cmd += ["--policy-param", p]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"simulate failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
    res = {}
    for s in strategies.split(","):
        name = "kv_aware" if s == "default" else s
        res[name] = figures(json.loads((out / name / "summary.json").read_text()))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.policy_search", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fleets", default="4", help="comma-separated backend counts (default %(default)s)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated (default: all)")
    ap.add_argument("--candidate", action="append", default=[], metavar="NAME=P1=V1,P2=V2",
                    help="a kv_aware setting to try: NAME=kv_aware.x=1,kv_aware.y=2 (NAME= alone: the defaults)")
    ap.add_argument("--seeds", default="0", help="comma-separated workload seeds (default %(default)s)")
    ap.add_argument("--scale-requests", type=float, default=1.0, help="requests x this (default %(default)s)")
    ap.add_argument("--out", default="/tmp/policy-search", help="work folder (default %(default)s)")
    ap.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    cands = {}
    for c in ns.candidate or ["defaults="]:
        name, _, rest = c.partition("=")
        cands[name] = [p for p in rest.split(",") if p]
    rows = []
    for fleet in [int(x) for x in ns.fleets.split(",")]:
        for sc in ns.scenarios.split(","):
            for seed in [int(x) for x in ns.seeds.split(",")]:
                flags = scenario_flags(sc, fleet, ns.scale_requests)
                tag = f"{sc}-{fleet}-s{seed}-n{flags[flags.index('--requests') + 1]}"
                cache = out / f"base-{tag}.json"
                if cache.exists():
                    base = json.loads(cache.read_text())
                else:
                    base = simulate(ns.python, out / "runs" / f"base-{tag}", flags, ",".join(BASELINES), [], seed)
                    cache.write_text(json.dumps(base))
                best = {k: min(base[b][k] for b in BASELINES) for k in KEYS}
                for name, params in cands.items():
                    ckey = out / f"cand-{tag}-{name}-{zlib.crc32(repr(params).encode()):08x}.json"
                    if ckey.exists():
                        kv = json.loads(ckey.read_text())
                    else:
                        kv = simulate(ns.python, out / "runs" / f"{tag}-{name}", flags, "default", params, seed)["kv_aware"]
                        ckey.write_text(json.dumps(kv))
                    ratios = {k: (kv[k] / best[k] if best[k] else float("nan")) for k in KEYS}
                    row = dict(fleet=fleet, scenario=sc, seed=seed, candidate=name, **ratios,
                               hit=kv["hit_rate"], hit_rr=base["round_robin"]["hit_rate"])
                    rows.append(row)
                    print(f"{fleet:>3} {sc:<10} s{seed} {name:<12} ttft_p50 {ratios['ttft_p50']:.3f}  ttft_p99 {ratios['ttft_p99']:.3f}"
                          f"  e2e_p50 {ratios['e2e_p50']:.3f}  hit {kv['hit_rate']:.3f} (rr {base['round_robin']['hit_rate']:.3f})",
                          flush=True)
    print("\nworst ratio over every scenario (kv_aware / best of round robin, least loaded):")
    for name in cands:
        mine = [r for r in rows if r["candidate"] == name]
        worst = {k: max(mine, key=lambda r: r[k]) for k in KEYS}
        print(f"  {name:<12} " + "  ".join(f"{k} {worst[k][k]:.3f} ({worst[k]['scenario']}@{worst[k]['fleet']})" for k in KEYS))
    (out / "search.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
