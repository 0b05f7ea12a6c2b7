"""Prefix-cache hit rate with an exact (KV-event-fed) index vs the approximate one, same seeded workload.

    .venv/bin/python -m tests.kv_events.bench_hit_rate [--workload rag] [--documents 40] [--requests 400]

Starts N emulators (924 blocks each, KV events on ephemeral ports) and two proxies over them: one
following their events, one guessing from its own routing. Each run starts from reset caches; hit
rate = cached prompt tokens / prompt tokens, as the backends report them. Prints both and the ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile

from emulator.config import EmulatorConfig
from emulator.server import STATE, start_emulators
from loadgen.config import RunConfig, WorkloadConfig
from loadgen.proxy_admin import ProxyAdmin
from loadgen.runner import run_workload
from loadgen.summary import hit_rate
from loadgen.workloads import build_workload
from proxy.config import ProxyConfig
from proxy.server import start_proxy


async def main(args: argparse.Namespace) -> None:
    logging.disable(logging.WARNING)
    kv = {"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:*", "replay_endpoint": "tcp://127.0.0.1:*", "topic": "kv-events"}
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=args.time_scale, log_requests=False, kv_events_config=kv), args.backends)
    flags = [f"{e.app[STATE].kv_events.last_endpoint}?topic=kv-events&replay={e.app[STATE].kv_events.replay_last_endpoint}" for e in ems]
    base = dict(port=0, backends=[e.url for e in ems], time_scale=args.time_scale, strategy=args.strategy, log_level="warning")
    proxies = {
        "exact": await start_proxy(ProxyConfig(**base, kv_events=flags)),
        "approximate": await start_proxy(ProxyConfig(**base)),
    }
    wl_cfg = WorkloadConfig(name=args.workload, requests=args.requests, documents=args.documents, seed=args.seed)
    workload = build_workload(wl_cfg)
    rates: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as out:
            for mode in args.order.split(","):
                p = proxies[mode]
                target = p.url + "/v1"
                await ProxyAdmin(target).reset()
                if mode == "exact":
                    follower = p.router.kv_events
                    while not all(follower.is_exact(e.url) for e in ems):
                        await asyncio.sleep(0.01)
                cfg = RunConfig(target=target, out=out, concurrency=args.concurrency, time_scale=args.time_scale,
                                progress=False, workload=wl_cfg)
                result = await run_workload(workload, cfg, [e.url for e in ems], label=mode)
                ok = sum(r.ok for r in result.records)
                rates[mode] = hit_rate(result.records)
                extra = ""
                if mode == "exact":
                    desyncs = sum(sum(s.stats.desyncs.values()) for s in p.router.kv_events.subscribers.values())
                    extra = f", desyncs {desyncs}"
                print(f"{mode:12s} hit rate {rates[mode]:.4f} ({ok}/{len(result.records)} ok{extra})", flush=True)
    finally:
        for p in proxies.values():
            await p.stop()
        for e in ems:
            await e.stop()
    if rates.get("approximate"):
        print(f"exact / approximate = {rates['exact'] / rates['approximate']:.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="rag")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--documents", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--time-scale", type=float, default=0.05)
    ap.add_argument("--strategy", default="kv_aware")
    ap.add_argument("--order", default="exact,approximate")
    asyncio.run(main(ap.parse_args()))
