"""Soak benchmark (a command, not a test): `python -m benchmarks.proxy_bench soak`.

Many concurrent streaming clients (spread over client processes: one Python process cannot drive
1,000 streams and measure them fairly) hold streams open through the proxy, run as its own process,
to time-scaled emulators in another process, for a bounded time. The emulators use the `simple`
engine, whose TTFT does not depend on load, so a TTFT change is the proxy's (and the shared CPU's).
Reported: the proxy's RSS (before, peak, after), the streams held open, and p99 TTFT under load
against the quiet value - the same request at concurrency 1, measured first in the same run - as a
ratio (target <= 2x). A direct-to-emulator probe under load tells the machine's share from the proxy's.

Everything shares one machine, so the token rate must fit it: the defaults (time scale 10: ~5.5
tokens/s per stream, ~5,500 tokens/s in all) keep a 2-core box below saturation; raise the rate
with a smaller --time-scale to find where the box, not the proxy, runs out of CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field

import aiohttp

from .common import WORDS, pct, start_process


@dataclass
class SoakConfig:
    clients: int = 1000
    duration: float = 60.0
    ramp: float = 5.0
    client_procs: int = 4
    emulators: int = 2
    time_scale: float = 10.0
    max_tokens: int = 32
    prompt_words: int = 60
    quiet_requests: int = 50
    strategy: str = "kv_aware"
    seed: int = 0


@dataclass
class StreamRecord:
    started: float  # wall clock (time.time), comparable across processes
    ttft: float | None
    ok: bool


@dataclass
class ClientReport:
    records: list[StreamRecord] = field(default_factory=list)
    cpu_s: float = 0.0


def raise_fd_limit() -> int:
    """Lift the soft open-file limit to the hard one (1,000 streams need ~2,000 sockets in the proxy)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def payload(rng: random.Random, cfg: SoakConfig) -> dict:
    prompt = " ".join(rng.choice(WORDS) for _ in range(cfg.prompt_words))
    return {"prompt": prompt, "max_tokens": cfg.max_tokens, "stream": True}


async def stream_once(session, url: str, body: dict, read_all: bool = True) -> tuple[float | None, bool]:
    """One streaming request: (seconds to the first body bytes, whether it ended with [DONE] and no error)."""
    t0 = time.perf_counter()
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                await r.read()
                return None, False
            ttft = None
            tail = b""
            error = False
            async for chunk in r.content.iter_any():
                if ttft is None:
                    ttft = time.perf_counter() - t0
                    if not read_all:
                        return ttft, True
                error = error or b'"error"' in chunk
                tail = (tail + chunk)[-32:]
            return ttft, not error and tail.endswith(b"data: [DONE]\n\n")
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return None, False


async def probe(url: str, n: int, cfg: SoakConfig, seed: int, until: float | None = None) -> list[float]:
    """TTFT at concurrency 1: `n` requests one after another (or until wall time `until`), each closed at its first bytes."""
    rng = random.Random(seed)
    out: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await stream_once(s, url, payload(rng, cfg), read_all=False)  # warm the connection
        while len(out) < n and (until is None or time.time() < until):
            ttft, _ = await stream_once(s, url, payload(rng, cfg), read_all=False)
            if ttft is not None:
                out.append(ttft)
    return out


def _client_main(url: str, n_streams: int, start_at: float, ramp: float, end_at: float, cfg: SoakConfig, seed: int, q) -> None:
    """A client process: `n_streams` loops, each streaming requests back to back until `end_at`."""
    raise_fd_limit()

    async def run() -> ClientReport:
        rep = ClientReport()
        timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as s:
            async def loop(k: int) -> None:
                rng = random.Random(seed * 100_003 + k)
                await asyncio.sleep(max(0.0, start_at + ramp * k / max(1, n_streams) - time.time()))
                while time.time() < end_at:
                    started = time.time()
                    ttft, ok = await stream_once(s, url, payload(rng, cfg))
                    rep.records.append(StreamRecord(started, ttft, ok))

            await asyncio.gather(*(loop(k) for k in range(n_streams)))
        return rep

    try:
        import uvloop

        rep = uvloop.run(run())
    except ImportError:
        rep = asyncio.run(run())
    t = resource.getrusage(resource.RUSAGE_SELF)
    rep.cpu_s = t.ru_utime + t.ru_stime
    q.put(rep)


async def _scrape_in_flight(url: str) -> float | None:
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("kvroute_requests_in_flight "):
                        return float(line.split()[1])
    except (OSError, asyncio.TimeoutError):
        return None
    return None


async def run_soak(cfg: SoakConfig) -> dict:
    """Run the whole benchmark; returns the figures (also printed)."""
    import psutil

    fd_limit = raise_fd_limit()
    blocks = 2 * cfg.clients * ((cfg.prompt_words + cfg.max_tokens) // 16 + 2) // cfg.emulators + 1024
    emu, emu_urls = start_process([
        "-m", "emulator", "--port", "0", "--replicas", str(cfg.emulators), "--engine", "simple",
        "--time-scale", str(cfg.time_scale), "--num-gpu-blocks", str(blocks), "--max-num-seqs", "100000",
        "--no-log-requests", "--log-format", "json",
    ], "EMULATOR_URL", cfg.emulators)
    prox = None
    procs: list = []
    try:
        backend_args = [a for u in emu_urls for a in ("--backend", u)]
        prox, (url,) = start_process([
            "-m", "proxy", "--port", "0", *backend_args, "--strategy", cfg.strategy, "--time-scale", str(cfg.time_scale),
            "--log-level", "warning", "--first-byte-timeout", "60", "--idle-timeout", "60",
        ], "listening on")
        proc = psutil.Process(prox.pid)
        emu_proc = psutil.Process(emu.pid)
        print(f"soak: {cfg.clients} streaming clients in {cfg.client_procs} processes for {cfg.duration:g} s "
              f"(+{cfg.ramp:g} s ramp); proxy {url} ({cfg.strategy}) -> {cfg.emulators} emulators (simple engine, "
              f"time scale {cfg.time_scale:g}); ~{cfg.prompt_words}-token prompts, {cfg.max_tokens} tokens each; fd limit {fd_limit}",
              flush=True)
        quiet = await probe(url, cfg.quiet_requests, cfg, seed=cfg.seed + 1)
        quiet_direct = await probe(emu_urls[0], cfg.quiet_requests, cfg, seed=cfg.seed + 2)
        rss_before = proc.memory_info().rss
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        start_at = time.time() + 4.0  # spawned interpreters need a moment to import
        steady_at = start_at + cfg.ramp
        end_at = steady_at + cfg.duration
        per = [cfg.clients // cfg.client_procs + (i < cfg.clients % cfg.client_procs) for i in range(cfg.client_procs)]
        for i, n in enumerate(per):
            p = ctx.Process(target=_client_main, args=(url, n, start_at, cfg.ramp, end_at, cfg, cfg.seed + 10 + i, q))
            p.start()
            procs.append(p)
        peak = rss_before
        in_flight: list[float] = []
        cpu0 = sum(proc.cpu_times()[:2])
        emu_cpu0 = sum(emu_proc.cpu_times()[:2])

        async def sample() -> None:
            nonlocal peak
            next_scrape = steady_at
            while time.time() < end_at:
                peak = max(peak, proc.memory_info().rss)
                if time.time() >= next_scrape:
                    v = await _scrape_in_flight(url)
                    if v is not None:
                        in_flight.append(v)
                    next_scrape += 0.25
                await asyncio.sleep(0.05)

        async def loaded_probes() -> tuple[list[float], list[float]]:
            await asyncio.sleep(max(0.0, steady_at - time.time()))
            half = steady_at + cfg.duration / 2
            via_proxy = await probe(url, 10**9, cfg, seed=cfg.seed + 3, until=half)
            direct = await probe(emu_urls[0], 10**9, cfg, seed=cfg.seed + 4, until=end_at)
            return via_proxy, direct

        _, (loaded_probe, loaded_direct) = await asyncio.gather(sample(), loaded_probes())
        reports: list[ClientReport] = []
        for _ in procs:
            reports.append(await asyncio.to_thread(q.get, True, cfg.duration + 180))
        for p in procs:
            await asyncio.to_thread(p.join, 30)
        proxy_cpu = sum(proc.cpu_times()[:2]) - cpu0
        emu_cpu = sum(emu_proc.cpu_times()[:2]) - emu_cpu0
        deadline = time.monotonic() + 30
        settled = await _scrape_in_flight(url)
        while settled != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            settled = await _scrape_in_flight(url)
        rss_after = proc.memory_info().rss
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in (prox, emu):
            if p is not None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()

    records = [r for rep in reports for r in rep.records]
    steady = [r for r in records if r.started >= steady_at]
    ttfts = [r.ttft for r in steady if r.ttft is not None]
    ok = sum(r.ok for r in records)
    failed = len(records) - ok
    q_p99, l_p99 = pct(quiet, 99), pct(ttfts, 99) if ttfts else float("nan")
    res = {
        "streams": len(records), "ok": ok, "failed": failed,
        "tokens_per_s": ok * cfg.max_tokens / (cfg.ramp + cfg.duration),
        "in_flight_mean": statistics.fmean(in_flight) if in_flight else float("nan"),
        "in_flight_min": min(in_flight) if in_flight else float("nan"),
        "in_flight_max": max(in_flight) if in_flight else float("nan"),
        "quiet_p50": statistics.median(quiet), "quiet_p99": q_p99,
        "loaded_p50": statistics.median(ttfts) if ttfts else float("nan"), "loaded_p99": l_p99,
        "ratio_p99": l_p99 / q_p99,
        "probe_loaded_p99": pct(loaded_probe, 99) if loaded_probe else float("nan"),
        "direct_quiet_p99": pct(quiet_direct, 99),
        "direct_loaded_p99": pct(loaded_direct, 99) if loaded_direct else float("nan"),
        "rss_before_mb": rss_before / 2**20, "rss_peak_mb": peak / 2**20, "rss_after_mb": rss_after / 2**20,
        "proxy_cpu_per_s": proxy_cpu / (end_at - start_at),
        "emulator_cpu_per_s": emu_cpu / (end_at - start_at),
        "client_cpu_per_s": sum(rep.cpu_s for rep in reports) / (end_at - start_at),
        "in_flight_after": settled,
    }
    print(f"streams: {res['streams']} finished ({ok} complete, {failed} failed); ~{res['tokens_per_s']:.0f} tokens/s through the proxy")
    print(f"streams open in the proxy during the steady phase: mean {res['in_flight_mean']:.0f}, min {res['in_flight_min']:.0f}, "
          f"max {res['in_flight_max']:.0f} ({len(in_flight)} scrapes)"
          f" (target {cfg.clients}); in flight after the load: {settled}")
    print(f"proxy RSS: {res['rss_before_mb']:.1f} MB before, {res['rss_peak_mb']:.1f} MB peak, {res['rss_after_mb']:.1f} MB after; "
          f"CPU (cores, of {psutil.cpu_count()}): proxy {res['proxy_cpu_per_s']:.2f}, emulators {res['emulator_cpu_per_s']:.2f}, "
          f"clients {res['client_cpu_per_s']:.2f}")
    print(f"TTFT via proxy  quiet (c=1, n={len(quiet)}): p50 {res['quiet_p50'] * 1e3:.1f} ms  p99 {q_p99 * 1e3:.1f} ms")
    print(f"TTFT via proxy  loaded (all clients, n={len(ttfts)}): p50 {res['loaded_p50'] * 1e3:.1f} ms  p99 {l_p99 * 1e3:.1f} ms"
          f"  -> p99 ratio {res['ratio_p99']:.2f}x (target <= 2x)")
    print(f"TTFT probe (c=1) under load: via proxy p99 {res['probe_loaded_p99'] * 1e3:.1f} ms; direct to an emulator "
          f"p99 {res['direct_loaded_p99'] * 1e3:.1f} ms (quiet direct p99 {res['direct_quiet_p99'] * 1e3:.1f} ms)")
    return res


def add_parser(sub) -> None:
    s = sub.add_parser("soak", help="many concurrent streaming clients through the proxy: peak RSS, p99 TTFT vs quiet",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = SoakConfig()
    s.add_argument("--clients", type=int, default=d.clients, help="concurrent streaming clients")
    s.add_argument("--duration", type=float, default=d.duration, help="seconds of steady load after the ramp")
    s.add_argument("--ramp", type=float, default=d.ramp, help="seconds over which the clients start")
    s.add_argument("--client-procs", type=int, default=d.client_procs, help="processes the clients are spread over")
    s.add_argument("--emulators", type=int, default=d.emulators, help="emulated backends behind the proxy")
    s.add_argument("--time-scale", type=float, default=d.time_scale, help="the emulators' time scale")
    s.add_argument("--max-tokens", type=int, default=d.max_tokens, help="output tokens per request")
    s.add_argument("--prompt-words", type=int, default=d.prompt_words, help="prompt length in words")
    s.add_argument("--quiet-requests", type=int, default=d.quiet_requests, help="requests timed alone first (the quiet TTFT)")
    s.add_argument("--strategy", default=d.strategy, help="routing strategy")


def main(args: argparse.Namespace) -> None:
    names = SoakConfig.__dataclass_fields__
    cfg = SoakConfig(**{k: v for k, v in vars(args).items() if k in names})
    asyncio.run(run_soak(cfg))
