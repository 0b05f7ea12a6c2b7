"""Bench: one kv_aware decision with N requests in flight against the same decision idle, as a ratio.

    python -m benchmarks.proxy_inflight [--in-flight 4000] [--backends 4] [--repeat 2000]

The decision reads per-backend running totals updated on route / first byte / end, so its cost
should not grow with the requests in flight (issue #14's target: within 2x of idle at 4,000). Both
figures are measured in the same run on the same prompt; the walk the totals replaced
(`Backend.queue_state_scan`) is timed too, for scale.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from proxy.config import ProxyConfig
from proxy.routing.router import Router


def _median_us(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.proxy_inflight", description=__doc__.split("\n")[0])
    ap.add_argument("--in-flight", type=int, default=4000)
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args(argv)
    urls = [f"http://127.0.0.1:{20000 + i}" for i in range(args.backends)]
    r = Router(ProxyConfig(backends=urls, strategy="kv_aware", time_scale=1000.0).routing())  # nothing expires mid-run
    for u in urls:
        r.add_backend(u)
    rng = random.Random(0)
    prompt = [rng.randrange(100, 50000) for _ in range(1024)]
    ctx = r.context(prompt, 64)
    r.end(r.begin(ctx, r.decide(ctx)))  # the prompt is indexed on one backend

    ask = r.context(prompt, 64)  # hashed and matched once: what is timed is the decision itself
    ask.matches

    def decide() -> None:
        r.decide(ask)

    idle = _median_us(decide, args.repeat)
    recs = []
    for i in range(args.in_flight):
        c = r.context([rng.randrange(100, 50000) for _ in range(64)], 64)
        rec = r.begin(c, r.decide(c, "round_robin"), "round_robin")
        if i % 2:
            r.first_byte(rec)
        recs.append(rec)
    busy = _median_us(decide, args.repeat)
    t = time.monotonic()
    scan = _median_us(lambda: [b.queue_state_scan(t, 0.018, 1000.0) for b in r.registry], max(1, args.repeat // 10))
    for rec in recs:
        r.end(rec)
    print(f"kv_aware decision (hashing and matching excluded), 1,024-token prompt, {args.backends} backends (median of {args.repeat}):")
    print(f"  idle                    {idle:8.1f} us")
    print(f"  {args.in_flight:,} in flight         {busy:8.1f} us   ratio {busy / idle:.2f}x idle (target <= 2x)")
    print(f"  (the per-request walk the running totals replace: {scan:.1f} us for all backends)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
