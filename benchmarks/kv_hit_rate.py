"""Prefix-cache hit rate with an exact (KV-event-fed) index vs the approximate one, same seeded workloads.

    .venv/bin/python -m benchmarks.kv_hit_rate [--workload rag] [--documents 40] [--requests 400] [--seeds 0,1,2,3,4] [--explain]

Starts N emulators (924 blocks each, KV events on ephemeral ports) and two proxies over them: one
following their events, one guessing from its own routing. For each seed both run the same workload
from reset caches; hit rate = cached prompt tokens / prompt tokens, as the backends report them.
Prints both per seed with their ratio, then the ratio's mean and range. Target: exact >= approximate.
A run varies by 0.01-0.02 on the same seed (`--seeds 0,0,0,0` measures it), so judge over seeds and
by the per-mode counters: `index right` (matched blocks = the backend's cached tokens / 16),
`duplicate prefills` (rag: a request missed most of its document while an earlier one for it still
ran on another backend) and, with `--explain`, `routing loss` (blocks the chosen backend held fewer
of than the best one, by the emulators' caches at decision time; "unknown" where the index did not
know what the best one held). Why exact lost and what changed:
docs/exact-vs-approximate.md.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile

from emulator.config import EmulatorConfig
from emulator.server import STATE, RunningEmulator, start_emulators
from kvblocks import hash_to_int
from loadgen.client import RequestRecord
from loadgen.config import RunConfig, WorkloadConfig
from loadgen.proxy_admin import ProxyAdmin
from loadgen.runner import run_workload
from loadgen.summary import hit_rate
from loadgen.workloads import build_workload
from proxy.config import ProxyConfig
from proxy.routing.router import Router
from proxy.app import start_proxy


BLOCK = 16  # the emulators' block size


def duplicate_prefills(records: list[RequestRecord]) -> int | None:
    """Requests that computed most of their prompt while an earlier request for the same document
    was still running on another backend (None when the workload has no documents)."""
    ok = sorted((r for r in records if r.ok and r.e2e is not None), key=lambda r: r.start)
    if not ok or "doc" not in ok[0].tags:
        return None
    n = 0
    for i, r in enumerate(ok):
        if r.cached_tokens * 2 >= r.prompt_tokens:
            continue
        doc = r.tags["doc"]
        if any(o.tags["doc"] == doc and o.backend != r.backend and o.start + o.e2e > r.start for o in ok[:i]):
            n += 1
    return n


class RoutingLoss:
    """`--explain`: at each decision, blocks of the prompt the chosen backend held fewer of than the best
    backend, by the emulators' own caches at that moment (a request queued but not yet scheduled is not
    in them, so following it to its backend can count as a small loss)."""

    def __init__(self, router: Router, emulators: list[RunningEmulator]) -> None:
        self.blocks = self.decisions = 0
        self.unknown = 0  # of `blocks`: lost where the index did not know what the best backend held
        self._texts: dict[int, str] = {}
        self._emulators = emulators
        text_context, decide = router.text_context, router.decide

        def probe_text(text, *a, **kw):
            ctx = text_context(text, *a, **kw)
            self._texts[id(ctx)] = text
            return ctx

        def probe_decide(ctx, *a, **kw):
            decision = decide(ctx, *a, **kw)
            text = self._texts.pop(id(ctx), None)
            hashes = router.hashes(router.tokenize(text)) if text is not None else ctx.full_hashes()
            held = {e.url: self._held(e, hashes) for e in self._emulators}
            best = max(held, key=held.__getitem__)
            lost = held[best] - held.get(decision.backend.url, 0)
            if lost > 0:
                self.blocks += lost
                self.decisions += 1
                if (ctx.matches or {}).get(best, 0) < held[best]:
                    self.unknown += lost
            return decision

        router.text_context, router.decide = probe_text, probe_decide

    @staticmethod
    def _held(em: RunningEmulator, hashes) -> int:
        cached = {hash_to_int(h) for h in em.engine.block_pool.cached_block_hash_to_block}
        n = 0
        for h in hashes:
            if h not in cached:
                break
            n += 1
        return n

    def take(self) -> str:
        out = f"routing loss {self.blocks} blocks in {self.decisions} decisions ({self.unknown} unknown to the index)"
        self.blocks = self.decisions = self.unknown = 0
        return out


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
    probes = {mode: RoutingLoss(p.router, ems) for mode, p in proxies.items()} if args.explain else {}
    ratios: list[float] = []
    try:
        with tempfile.TemporaryDirectory() as out:
            for seed in args.seeds:
                wl_cfg = WorkloadConfig(name=args.workload, requests=args.requests, documents=args.documents, seed=seed)
                workload = build_workload(wl_cfg)
                rates: dict[str, float] = {}
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
                    right = sum(r.matched_blocks == r.cached_tokens // BLOCK for r in result.records if r.ok)
                    ttft = statistics.fmean(r.ttft for r in result.records if r.ok and r.ttft is not None)
                    extra = f", mean TTFT {1000 * ttft:.1f} ms, index right {right}/{ok}"
                    dup = duplicate_prefills(result.records)
                    if dup is not None:
                        extra += f", duplicate prefills {dup}"
                    if mode in probes:
                        extra += f", {probes[mode].take()}"
                    if mode == "exact":
                        desyncs = sum(sum(s.stats.desyncs.values()) for s in p.router.kv_events.subscribers.values())
                        extra += f", desyncs {desyncs}"
                    print(f"seed {seed}  {mode:12s} hit rate {rates[mode]:.4f} ({ok}/{len(result.records)} ok{extra})", flush=True)
                if rates.get("approximate") and "exact" in rates:
                    ratios.append(rates["exact"] / rates["approximate"])
                    print(f"seed {seed}  exact / approximate = {ratios[-1]:.3f}", flush=True)
    finally:
        for p in proxies.values():
            await p.stop()
        for e in ems:
            await e.stop()
    if ratios:
        wins = sum(r >= 1.0 for r in ratios)
        print(f"exact / approximate over {len(ratios)} runs: mean {statistics.fmean(ratios):.3f}, "
              f"range {min(ratios):.3f}-{max(ratios):.3f}, exact >= approximate in {wins} of {len(ratios)}")


def _seeds(value: str) -> list[int]:
    return [int(s) for s in value.split(",") if s.strip()]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="rag")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--documents", type=int, default=40)
    ap.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4], help="comma-separated; each runs both modes")
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--time-scale", type=float, default=0.05)
    ap.add_argument("--strategy", default="kv_aware")
    ap.add_argument("--order", default="exact,approximate")
    ap.add_argument("--explain", action="store_true", help="also count each mode's routing loss against the emulators' caches")
    asyncio.run(main(ap.parse_args()))
