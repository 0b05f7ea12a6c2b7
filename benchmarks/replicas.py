"""Do N router replicas route as well as one? The same seeded workload through 1, 2 and 4 replicas.

Each run starts fresh emulators (`python -m emulator --replicas 4`, empty caches) and N
`python -m proxy` replicas over them - sharing what they route over ipc:// (`--replica-bind`,
`--peer`) or not - then `python -m loadgen run --target R0 --also-target R1 ...` spreads the requests
round robin over the replicas. One replica is run twice: the difference between those two runs is
the run-to-run noise the others are judged against. Prints one markdown table per workload.

    python -m benchmarks.replicas [--workloads rag,burst] [--replicas 2,4] [--time-scale 0.5] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {
    # docs/results/sweep-workloads.sh's workloads at their middle load
    "rag": ["--workload", "rag", "--documents", "16", "--doc-tokens-min", "1000", "--doc-tokens-max", "4000",
            "--rate", "8", "--requests", "160"],
    "burst": ["--workload", "burst", "--burst-prefixes", "4", "--rate", "16", "--requests", "240"],
}


def _spawn(args: Sequence[str], ready: str, lines: int = 1) -> tuple[subprocess.Popen, list[str]]:
    """A `python -m ...` child and the URLs on its first `lines` lines containing `ready`."""
    p = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    urls: list[str] = []
    deadline = time.monotonic() + 120
    while len(urls) < lines and time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if ready in line:
            urls.append(next(t for t in line.split() if t.startswith("http://")))
    if len(urls) < lines:
        p.kill()
        raise RuntimeError(f"python -m {' '.join(args)} did not start")
    return p, urls


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    p.stdout.close()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _wait_synced(proxies: Sequence[str], timeout: float = 60) -> None:
    """Every replica follows every other (polled; bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [_get(u + "/admin/backends").get("replicas") for u in proxies]
        if all(s and len(s["peers"]) == len(proxies) - 1 and s["peers_lost"] == 0 for s in states):
            return
        time.sleep(0.1)
    raise RuntimeError("replicas did not follow each other in time")


def one_run(workload: str, n: int, shared: bool, time_scale: float, seed: int, out: Path) -> dict:
    emulators, backends = _spawn(["emulator", "--replicas", "4", "--port", "0", "--time-scale", str(time_scale)],
                                 "EMULATOR_URL", lines=4)
    ipc = tempfile.mkdtemp(prefix="kvroute-bench-")
    procs: list[subprocess.Popen] = []
    try:
        urls = []
        for i in range(n):
            args = ["proxy", "--port", "0", "--time-scale", str(time_scale), "--log-level", "warning"]
            for b in backends:
                args += ["--backend", b]
            if shared and n > 1:
                args += ["--replica-bind", f"ipc://{ipc}/r{i}"]
                args += [a for j in range(n) if j != i for a in ("--peer", f"ipc://{ipc}/r{j}")]
            p, (url,) = _spawn(args, "listening on")
            procs.append(p)
            urls.append(url)
        if shared and n > 1:
            _wait_synced(urls)
        name = f"{workload}-{n}{'-shared' if shared and n > 1 else '-alone' if n > 1 else ''}-{len(list(out.glob(workload + '*')))}"
        cmd = [sys.executable, "-m", "loadgen", "run", "--target", urls[0] + "/v1",
               *[a for u in urls[1:] for a in ("--also-target", u + "/v1")], *WORKLOADS[workload],
               "--time-scale", str(time_scale), "--seed", str(seed), "--no-progress", "--out", str(out / name)]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        summary = json.loads((out / name / "summary.json").read_text())
        return {"replicas": n, "shared": shared, "hit_rate": summary["hit_rate"],
                "ttft_p50": summary["ttft_p50_emulated"], "ttft_p99": summary["ttft_p99_emulated"],
                "errors": summary["errors"], "ok": summary["ok"]}
    finally:
        for p in procs:
            _stop(p)
        _stop(emulators)
        shutil.rmtree(ipc, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.replicas", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="rag,burst", help="comma-separated, of " + ", ".join(WORKLOADS))
    ap.add_argument("--replicas", default="2,4", help="replica counts besides 1 (default %(default)s)")
    ap.add_argument("--time-scale", type=float, default=0.5, help="emulators' wall s per emulated s (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "kvroute-replicas-bench"),
                    help="loadgen results folder (default %(default)s)")
    ns = ap.parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    for w in ns.workloads.split(","):
        if w not in WORKLOADS:
            ap.error(f"--workloads: unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    counts = [int(x) for x in ns.replicas.split(",") if x.strip()]
    for w in ns.workloads.split(","):
        plan = [(1, False), (1, False)] + [(n, s) for n in counts for s in (True, False)]
        rows = [one_run(w, n, s, ns.time_scale, ns.seed, out) for n, s in plan]
        print(f"\n{w} ({' '.join(WORKLOADS[w])}, --time-scale {ns.time_scale:g}, seed {ns.seed})\n")
        print("| replicas | sharing | hit rate | vs 1 replica | TTFT p50 (s) | TTFT p99 (s) | errors |")
        print("|---|---|---|---|---|---|---|")
        base = rows[0]
        for k, r in enumerate(rows):
            label = "1 (again: noise)" if k == 1 else str(r["replicas"])
            sharing = "-" if r["replicas"] == 1 else "yes" if r["shared"] else "no"
            print(f"| {label} | {sharing} | {r['hit_rate']:.1%} | {100 * (r['hit_rate'] - base['hit_rate']):+.1f} pt "
                  f"| {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {r['errors']} |", flush=True)


if __name__ == "__main__":
    main()
