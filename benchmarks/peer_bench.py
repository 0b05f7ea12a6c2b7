"""`python -m benchmarks.peer_bench`: kvroute against the peer routers, in one run, as ratios.

Starts zero-delay stub backends (`benchmarks.peer_stub`), sglang-router and vllm-router
(round_robin; their venv is built once by `tools/peer_env.sh` from registry wheels, outside the
repo) and kvroute, all over the same four stubs on loopback, then runs interleaved rounds of
bounded load: c=32 non-stream for the router's CPU per request (utime+stime of its process tree
from /proc, divided by the answered requests) and c=64 / c=128 non-stream for throughput. Prints
medians over rounds with their spread and every figure as a ratio against sglang-router
round_robin measured in the same run, plus the load the rest of the machine put on the cores.

Figures from a shared machine are only comparable within one run: that is why the baseline runs
beside kvroute, and why the rounds rotate the order of the targets.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "sglang-rr"
FILLER = ("You are a helpful assistant. Answer the user's question concisely and cite the "
          "relevant part of the context when possible. ") * 4  # ~440 chars, like the peer harness


# -- processes ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_venv() -> Path:
    """The peer routers' venv (built once, cached under ~/.cache/kvroute)."""
    out = subprocess.run(["bash", str(ROOT / "tools" / "peer_env.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class Target:
    name: str
    argv: list[str]
    port: int
    cwd: Path = ROOT
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start(t: Target, logdir: Path) -> None:
    env = {**os.environ, **t.env}
    log = open(logdir / f"{t.name}.log", "wb")
    t.proc = subprocess.Popen(t.argv, cwd=t.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)


def stop(p: subprocess.Popen | None) -> None:
    """Stop one process we started (and its process group: --workers children), by PID."""
    if p is None or p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)


def http_ok(url: str, body: bytes | None = None, timeout: float = 3.0) -> bool:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status == 200
    except Exception:  # noqa: BLE001 - not up yet
        return False


def wait_ready(t: Target, seconds: float = 60.0) -> bool:
    """Up when /health answers and one completion goes through."""
    end = time.monotonic() + seconds
    ping = json.dumps({"model": "stub-model", "prompt": "ping", "max_tokens": 4}).encode()
    while time.monotonic() < end:
        if t.proc is not None and t.proc.poll() is not None:
            return False
        if http_ok(t.url + "/health") and http_ok(t.url + "/v1/completions", ping):
            return True
        time.sleep(0.3)
    return False


def tree_pids(pid: int) -> list[int]:
    """A process and all its descendants (a --workers parent forks its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").exists() else ():
            with contextlib.suppress(OSError, ValueError):
                todo += [int(x) for x in (task / "children").read_text().split()]
    return out


def tree_cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process tree: system is mostly the socket syscalls."""
    tck = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(f[11]) / tck
            system += int(f[12]) / tck
    return user, system


def machine_busy_s() -> float:
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")


# -- load -----------------------------------------------------------------------------------------
async def load(url: str, c: int, n: int, warmup: int, seed: int, max_s: float, watch: list[int]) -> dict:
    """n non-stream completions at concurrency c (after warmup), bounded by max_s seconds."""
    import aiohttp

    rnd = random.Random(seed)
    total = warmup + n
    bodies = [json.dumps({"model": "stub-model", "max_tokens": 4, "temperature": 0,
                          "prompt": f"[session {rnd.randrange(64)}] {FILLER}\nQuestion {i}: "
                                    f"what is {rnd.randrange(10**6)}?"}).encode() for i in range(total)]
    target = url + "/v1/completions"
    hdrs = {"Content-Type": "application/json"}
    ok = err = 0
    idx = 0
    deadline = time.monotonic() + max_s
    conn = aiohttp.TCPConnector(limit=c * 2, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
        async def worker(limit: int, record: bool) -> None:
            nonlocal idx, ok, err
            while idx < limit and time.monotonic() < deadline:
                i = idx
                idx += 1
                try:
                    async with s.post(target, data=bodies[i], headers=hdrs) as r:
                        data = await r.read()
                        good = r.status == 200 and b'"choices"' in data
                except Exception:  # noqa: BLE001 - counted as an error
                    good = False
                if record:
                    ok += good
                    err += not good

        await asyncio.gather(*(worker(warmup, False) for _ in range(c)))
        idx = warmup
        cpu0 = [tree_cpu_s(p) for p in watch]
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        mb0 = machine_busy_s()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(total, True) for _ in range(c)))
        wall = time.perf_counter() - t0
        mb1 = machine_busy_s()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu1 = [tree_cpu_s(p) for p in watch]
    used = [(b[0] - a[0]) + (b[1] - a[1]) for a, b in zip(cpu0, cpu1)]
    sys_s = [b[1] - a[1] for a, b in zip(cpu0, cpu1)]
    client = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    other = (mb1 - mb0) - client - sum(used)
    return {"ok": ok, "err": err, "wall_s": wall, "rps": ok / wall if wall else 0.0,
            "cpu_us": [u / ok * 1e6 if ok else float("nan") for u in used],
            "sys_us": [u / ok * 1e6 if ok else float("nan") for u in sys_s],
            "other_cores": other / wall if wall else float("nan"), "timed_out": time.monotonic() >= deadline}


# -- report ---------------------------------------------------------------------------------------
def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float], nd: int = 0) -> str:
    xs = [x for x in xs if x == x]
    return f"{min(xs):.{nd}f}-{max(xs):.{nd}f}" if xs else "-"


def report(results: dict[str, dict[str, list[dict]]], names: list[str], env: dict) -> str:
    """results[target][kind] = one record per round; kind in cpu32, c64, c128.

    Ratios are taken per round (the target against sglang-router measured in the same round, minutes
    apart at most), then the median over rounds with their range: drift in the machine's background
    load between rounds cancels out of a ratio better than out of medians taken separately."""
    lines = [f"peer_bench: {env['rounds']} rounds, n={env['n_cpu']} (c=32) / {env['n_thrpt']} (c=64, c=128) "
             f"non-stream requests per run, 4 zero-delay stubs, {env['ncpu']} cores, nice {env['nice']}",
             f"loadavg before {env['load_before']} / after {env['load_after']}; 'other cores': CPU the rest of "
             "the machine used during the runs besides the client, router and stubs (median / max)", ""]

    def by_round(target: str, kind: str, f) -> dict[int, float]:
        return {r["round"]: f(r) for r in results.get(target, {}).get(kind, [])}

    def cell(target: str, kind: str, f, nd: int = 0) -> tuple[str, str]:
        mine = by_round(target, kind, f)
        base = by_round(BASELINE, kind, f)
        vals = list(mine.values())
        ratios = [mine[r] / base[r] for r in mine if r in base and base[r]]
        v = f"{med(vals):.{nd}f} ({spread(vals, nd)})" if vals else "-"
        x = f"{med(ratios):.2f} ({spread(ratios, 2)})" if ratios else "-"
        return v, x

    def cpu(r: dict) -> float:
        return r["cpu_us"][0]

    def rps(r: dict) -> float:
        return r["rps"]

    lines += ["| target | CPU us/req c=32 | x sglang-rr | of it system (syscalls) | req/s c=64 | x sglang-rr "
              "| req/s c=128 | x sglang-rr | errors | other cores |", "|" + "---|" * 10]
    for t in names:
        if t not in results:
            lines.append(f"| {t} | did not start |" + " |" * 8)
            continue
        c32, x32 = cell(t, "cpu32", cpu)
        sys_share = [r["sys_us"][0] / r["cpu_us"][0] for r in results[t].get("cpu32", []) if r["cpu_us"][0]]
        r64, x64 = cell(t, "c64", rps)
        r128, x128 = cell(t, "c128", rps)
        recs = [r for k in ("cpu32", "c64", "c128") for r in results[t].get(k, [])]
        oc = [r["other_cores"] for r in recs]
        lines.append(f"| {t} | {c32} | {x32} | {med(sys_share):.0%} | {r64} | {x64} | {r128} | {x128} | "
                     f"{sum(r['err'] for r in recs)} | {med(oc):.2f} / {max(oc):.2f} |")
    lines += ["", "Cells: median over rounds (range). Ratios: per round against sglang-rr, then the median."]
    if BASELINE not in results:
        lines.append("(sglang-router round_robin did not run: no ratios)")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------
def build_targets(args: argparse.Namespace, venv: Path | None, stubs: list[str], backends_file: Path) -> list[Target]:
    peer_env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    ts: list[Target] = []
    if venv is not None:
        for pol in args.peer_policies:
            short = {"round_robin": "rr", "cache_aware": "ca"}.get(pol, pol)
            p = free_port()
            ts.append(Target(f"sglang-{short}", [str(venv / "bin/python"), "-m", "sglang_router.launch_router",
                                                 "--host", "127.0.0.1", "--port", str(p),
                                                 "--prometheus-host", "127.0.0.1", "--prometheus-port",
                                                 str(free_port()), "--worker-urls", *stubs, "--policy", pol,
                                                 "--log-level", "warn"], p, env=peer_env))
            p = free_port()
            ts.append(Target(f"vllm-{short}", [str(venv / "bin/vllm-router"), "--host", "127.0.0.1", "--port", str(p),
                                               "--prometheus-host", "127.0.0.1", "--prometheus-port",
                                               str(free_port()), "--worker-urls", *stubs, "--policy", pol,
                                               "--log-level", "warning"], p, env=peer_env))

    def kvroute(name: str, tree: Path, extra: list[str]) -> Target:
        p = free_port()
        return Target(name, [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(p),
                             "--backends-file", str(backends_file), "--log-level", "warning", *extra],
                      p, cwd=tree, env={"PYTHONPATH": str(tree)})

    for strat in args.strategies:
        label = "kvroute" if strat == "kv_aware" else f"kvroute-{strat}"
        ts.append(kvroute(label, ROOT, ["--strategy", strat]))
    for w in args.workers:
        ts.append(kvroute(f"kvroute-w{w}", ROOT, ["--workers", str(w)]))
    for spec in args.compare_tree:
        label, _, rest = spec.partition("=")
        tree, *extra = rest.split(",")
        for strat in args.strategies:
            ts.append(kvroute(label if strat == "kv_aware" else f"{label}-{strat}", Path(tree).resolve(),
                              ["--strategy", strat, *extra]))
    return ts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peer_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-cpu", type=int, default=3000, help="requests per c=32 run (CPU per request)")
    ap.add_argument("--n-thrpt", type=int, default=4000, help="requests per c=64 and c=128 run (throughput)")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="hard time bound of one load run")
    ap.add_argument("--peer-policies", nargs="*", default=["round_robin"], help="peer routers' policies to run")
    ap.add_argument("--no-peers", action="store_true", help="skip the peer routers (no venv needed)")
    ap.add_argument("--strategies", nargs="*", default=["kv_aware"], help="kvroute strategies to run")
    ap.add_argument("--workers", type=int, nargs="*", default=[], help="also run kvroute --workers N")
    ap.add_argument("--compare-tree", action="append", default=[], metavar="LABEL=DIR[,ARG...]",
                    help="also run kvroute (each of --strategies, with ARGs) from another checkout, e.g. the "
                         "commit before a change: base=/tmp/kvroute-base or w2=../other,--workers,2")
    ap.add_argument("--nice", type=int, default=0, help="lower this command's (and its children's) priority")
    ap.add_argument("--json", type=Path, help="write every run's record here")
    args = ap.parse_args(argv)
    for flag, v in (("--rounds", args.rounds), ("--n-cpu", args.n_cpu), ("--n-thrpt", args.n_thrpt)):
        if v < 1:
            print(f"{ap.prog}: error: {flag} must be >= 1", file=sys.stderr)
            return 2
    if args.nice:
        os.nice(args.nice)
    venv = None if args.no_peers else peer_venv()
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    logdir = Path(tempfile.mkdtemp(prefix="peer_bench-"))
    stub_ports = [free_port() for _ in range(4)]
    stubs = [f"http://127.0.0.1:{p}" for p in stub_ports]
    backends_file = logdir / "backends.txt"
    backends_file.write_text("\n".join(stubs) + "\n")
    stub = Target("stubs", [sys.executable, "-m", "benchmarks.peer_stub", "--ports", *map(str, stub_ports),
                            "--quiet-unknown", "--max-lifetime-s", "3600"], stub_ports[0])
    targets = build_targets(args, venv, stubs, backends_file)
    env = {"rounds": args.rounds, "n_cpu": args.n_cpu, "n_thrpt": args.n_thrpt, "ncpu": os.cpu_count(),
           "nice": os.nice(0), "load_before": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    results: dict[str, dict[str, list[dict]]] = {}
    try:
        start(stub, logdir)
        if not wait_ready(stub, 30):
            print(f"stubs did not come up (log: {logdir}/stubs.log)", file=sys.stderr)
            return 1
        for t in targets:
            start(t, logdir)
        ready = []
        for t in targets:
            if wait_ready(t):
                ready.append(t)
            else:
                print(f"{t.name} did not come up (log: {logdir}/{t.name}.log)", file=sys.stderr)
        for r in range(args.rounds):
            order = ready[r % len(ready):] + ready[:r % len(ready)] if ready else []
            print(f"round {r + 1}/{args.rounds} (loadavg {Path('/proc/loadavg').read_text().split()[0]})",
                  file=sys.stderr, flush=True)
            for t in order:
                assert t.proc is not None
                for kind, c, n in (("cpu32", 32, args.n_cpu), ("c64", 64, args.n_thrpt), ("c128", 128, args.n_thrpt)):
                    rec = run(load(t.url, c, n, args.warmup, r, args.max_seconds, [t.proc.pid, stub.proc.pid]))
                    rec["round"] = r
                    results.setdefault(t.name, {}).setdefault(kind, []).append(rec)
                    print(f"  {t.name:16s} c={c:<3d} ok={rec['ok']:<5d} err={rec['err']:<3d} {rec['rps']:7.0f} req/s "
                          f"cpu {rec['cpu_us'][0]:5.0f} us/req other_cores {rec['other_cores']:.2f}",
                          file=sys.stderr, flush=True)
    finally:
        for t in reversed(targets):
            stop(t.proc)
        stop(stub.proc)
    env["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(report(results, [t.name for t in targets], env))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
