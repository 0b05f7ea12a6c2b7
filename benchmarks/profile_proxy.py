"""`python -m benchmarks.profile_proxy`: where kvroute's CPU per request goes, under the peer harness's load.

Starts the zero-delay stubs and one kvroute (the strategy given), warms it up, then samples it with
py-spy (from the benchmarks' tools venv, `tools/peer_env.sh`; a registry wheel) while the c=32
non-stream load of `benchmarks.peer_bench` runs. Prints the measured CPU per request and the
functions with the most samples, self and inclusive, each as a share and as µs per request
(share x measured CPU per request), so a change can be aimed at what the profile shows.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.peer_bench import ROOT, Target, free_port, load, peer_venv, start, stop, wait_ready


def frame_name(frame: str) -> str:
    """`func (path/to/proxy/edge/front.py:123)` -> `proxy/edge/front.py:func`: our packages by their path
    from the repository root, others by file name (line dropped: one row per function)."""
    func, _, where = frame.partition(" (")
    if not where:
        return func
    parts = Path(where.rstrip(")").rsplit(":", 1)[0]).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("proxy", "kvblocks", "emulator"):
            return "/".join(parts[i:]) + ":" + func
    return f"{parts[-1] if parts else where}:{func}"


# Where a request's CPU goes, by stage: inclusive samples of these functions (file:function, as
# frame_name prints them). The event loop's own C code (epoll, socket reads, task stepping) shows as
# the self time of asyncio's runner, the frame under which uvloop runs.
STAGES = (
    ("tokenize + hash + index walk", ("proxy/routing/router.py:text_context",)),
    ("policy decision", ("proxy/routing/router.py:decide",)),
    ("in-flight bookkeeping + index record", ("proxy/routing/router.py:begin", "proxy/routing/router.py:end",
                                              "proxy/routing/router.py:first_byte")),
    ("request parse + checks", ("proxy/edge/openai_request.py:parse_completion", "proxy/edge/handlers.py:_check_length",
                                "proxy/edge/handlers.py:_check_model", "proxy/edge/handlers.py:_check_api_key")),
    ("upstream request (build + write)", ("proxy/upstream/client.py:post",)),
    ("upstream answer (parse + read)", ("proxy/upstream/client.py:data_received", "proxy/upstream/client.py:read")),
    ("client answer (build + write)", ("proxy/edge/front.py:send",)),
    ("client request (HTTP parse)", ("proxy/edge/front.py:data_received",)),
    ("metrics", ("metrics.py:inc", "metrics.py:observe", "proxy/metrics.py:child")),
)


def stages(frames_counts: list[tuple[list[str], int]], total: int, cpu_us: float) -> list[str]:
    out = ["| stage | share | us/req |", "|---|---|---|"]
    for label, names in STAGES:
        n = sum(k for frames, k in frames_counts if any(f in names for f in frames))
        out.append(f"| {label} | {n / total:.1%} | {n / total * cpu_us:.0f} |")
    loop = sum(k for frames, k in frames_counts if frames and frames[-1] == "runners.py:run")
    out.append(f"| event loop itself (uvloop: epoll, reads, task steps) | {loop / total:.1%} | {loop / total * cpu_us:.0f} |")
    return out


def summarize(raw: Path, top: int, cpu_us: float) -> str:
    """Collapsed stacks (`a;b;c N`) -> top self and inclusive functions."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    total = 0
    kept: list[tuple[list[str], int]] = []
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        k = int(n)
        total += k
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        kept.append((frames, k))
        self_n[frames[-1]] += k
        for f in set(frames):
            incl_n[f] += k
    if not total:
        return "no samples"
    out = [f"{total} samples; CPU per request {cpu_us:.0f} us (c=32 non-stream)", ""]
    out += stages(kept, total, cpu_us)
    out += ["", "| self: function | share | us/req |", "|---|---|---|"]
    out += [f"| {f} | {n / total:.1%} | {n / total * cpu_us:.0f} |" for f, n in self_n.most_common(top)]
    out += ["", "| inclusive: function | share | us/req |", "|---|---|---|"]
    out += [f"| {f} | {n / total:.1%} | {n / total * cpu_us:.0f} |" for f, n in incl_n.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategy", default="kv_aware")
    ap.add_argument("--n", type=int, default=20000, help="requests sampled (c=32 non-stream)")
    ap.add_argument("--seconds", type=float, default=30.0, help="hard time bound of the sampled load")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="include native (C) frames")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--summarize", type=Path, metavar="STACKS", help="only summarize stacks kept by --raw earlier")
    ap.add_argument("--cpu-us", type=float, default=0.0, help="with --summarize: the CPU per request measured then")
    ap.add_argument("--raw", type=Path, help="keep the collapsed stacks here (for a flame graph)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.seconds <= 0 or args.rate < 1:
        print(f"{ap.prog}: error: --n, --seconds and --rate must be positive", file=sys.stderr)
        return 2
    if args.summarize:
        print(summarize(args.summarize, args.top, args.cpu_us))
        return 0
    spy = peer_venv() / "bin" / "py-spy"
    logdir = Path(tempfile.mkdtemp(prefix="profile_proxy-"))
    raw = args.raw or logdir / "stacks.txt"
    ports = [free_port() for _ in range(4)]
    backends = logdir / "backends.txt"
    backends.write_text("".join(f"http://127.0.0.1:{p}\n" for p in ports))
    stub = Target("stubs", [sys.executable, "-m", "benchmarks.peer_stub", "--ports", *map(str, ports),
                            "--quiet-unknown", "--max-lifetime-s", "600"], ports[0])
    port = free_port()
    proxy = Target("kvroute", [sys.executable, "-m", "proxy", "--host", "127.0.0.1", "--port", str(port),
                               "--backends-file", str(backends), "--log-level", "warning",
                               "--strategy", args.strategy], port, env={"PYTHONPATH": str(ROOT)})
    spy_proc = None
    try:
        start(stub, logdir)
        start(proxy, logdir)
        if not (wait_ready(stub, 30) and wait_ready(proxy)):
            print(f"stubs or kvroute did not come up (logs: {logdir})", file=sys.stderr)
            return 1
        assert proxy.proc is not None
        asyncio.run(load(proxy.url, 32, 500, 200, 0, 30, []))  # warm caches before sampling
        cmd = [str(spy), "record", "--pid", str(proxy.proc.pid), "--rate", str(args.rate), "--format", "raw",
               "--output", str(raw), "--duration", str(int(args.seconds) + 5)]
        # Non-blocking sampling does not pause kvroute; native frames need it paused (slower while sampled).
        cmd.append("--native" if args.native else "--nonblocking")
        spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(logdir / "py-spy.log", "wb"))
        time.sleep(1.0)  # py-spy attaches (no readiness signal to wait on)
        rec = asyncio.run(load(proxy.url, 32, args.n, 0, 1, args.seconds, [proxy.proc.pid]))
        spy_proc.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        spy_proc.wait(30)
    finally:
        if spy_proc is not None and spy_proc.poll() is None:
            spy_proc.kill()
            spy_proc.wait(5)
        stop(proxy.proc)
        stop(stub.proc)
    print(f"kvroute --strategy {args.strategy}: {rec['ok']} requests, {rec['rps']:.0f} req/s, "
          f"other cores {rec['other_cores']:.2f}; stacks: {raw}")
    if not raw.exists():
        print(f"py-spy wrote no stacks (log: {logdir}/py-spy.log)", file=sys.stderr)
        return 1
    print(summarize(raw, args.top, rec["cpu_us"][0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
