"""Benchmarks (commands, not tests): `python -m benchmarks.proxy_bench overhead|decide|edge|soak` (soak: proxy_soak).

`overhead` measures the proxy's added latency, throughput and CPU per request against a direct
connection to the same zero-delay emulator, both in one run; `decide` times one routing decision
(tokenize + hash + match + policy) against a large index; `edge` runs kvroute and a bare aiohttp
pass-through on the same backends, interleaved, for the CPU and latency of the HTTP edge. Ratios
are printed against baselines measured in the same run.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from proxy.config import ProxyConfig
from proxy.routing.router import Router

from .common import WORDS, make_text, pct

# -- decide ----------------------------------------------------------------------------------------
def bench_decide(args: argparse.Namespace) -> None:
    backends = [f"http://10.0.0.{i}:8000" for i in range(args.backends)]
    cfg = ProxyConfig(backends=backends, strategy=args.strategy)
    router = Router(cfg.routing())
    per_backend = args.index_blocks // len(backends)
    for url in backends:
        router.add_backend(url)
        router.index.set_capacity(url, per_backend + 1000)
    text = make_text(args.tokens, seed=1)
    prompt_hashes = router.hashes(router.tokenizer.encode(text))
    rng = random.Random(2)
    # Fill: every backend holds filler chains; 8 of them also hold a part of this prompt's prefix.
    for i, url in enumerate(backends):
        own = prompt_hashes[: rng.randrange(1, len(prompt_hashes))] if i % (len(backends) // 8 or 1) == 0 else []
        filler = [rng.getrandbits(64) for _ in range(per_backend - len(own))]
        router.index.record_routed(url, filler)
        router.index.record_routed(url, own)
    print(f"index: {len(router.index):,} distinct blocks over {len(backends)} backends; "
          f"prompt {args.tokens} tokens = {len(prompt_hashes)} blocks; strategy {args.strategy}")
    def cold(t: str):
        return router.context(router.tokenizer.encode(t), 64)

    def warm(t: str):
        return router.text_context(t, 64)

    for label, make_ctx in (("cold: every prompt tokenized and hashed in full", cold),
                            ("warm: the prompt's document seen before (chunk + prefix-hash caches)", warm)):
        parts: dict[str, list[float]] = {"tokenize+hash": [], "decide": [], "total": []}
        for i in range(args.iterations + 20):
            t0 = time.perf_counter()
            ctx = make_ctx(text)
            t2 = time.perf_counter()
            d = router.decide(ctx)
            t3 = time.perf_counter()
            if i >= 20:
                parts["tokenize+hash"].append(t2 - t0)
                parts["decide"].append(t3 - t2)
                parts["total"].append(t3 - t0)
        print(label)
        for k, xs in parts.items():
            print(f"  {k:14s} median {statistics.median(xs) * 1e3:.3f} ms   p99 {pct(xs, 99) * 1e3:.3f} ms")
        med = statistics.median(parts["total"])
        print(f"  -> {d.backend.url} matched {d.matched_blocks} blocks; median total {med * 1e3:.3f} ms "
              f"= {med / 1e-3:.2f}x the 1 ms target")
    bench_route_unique(args)


def bench_route_unique(args: argparse.Namespace) -> None:
    """Routing alone (text to decision to index bookkeeping) for ~1,000-token prompts no backend
    holds, 4 backends at steady state: lazy prompts against tokenizing and hashing in full."""
    print("route: unique ~1,000-token prompts, 4 backends (text_context + decide + begin + end)")
    for label, lazy in (("lazy (default)", True), ("full tokenization", False)):
        router = Router(ProxyConfig(backends=[]).routing())
        for i in range(4):
            router.add_backend(f"http://10.0.1.{i}:8000")
        prompts = word_prompts(args.iterations * 3, 1000, seed=3)

        def route(text: str) -> None:
            ctx = router.text_context(text, 64, lazy=lazy)
            router.end(router.begin(ctx, router.decide(ctx)))

        for t in prompts[: args.iterations]:  # fill the index to capacity first
            route(t)
        times = []
        for t in prompts[args.iterations :]:
            t0 = time.perf_counter()
            route(t)
            times.append(time.perf_counter() - t0)
        print(f"  {label:18s} median {statistics.median(times) * 1e6:.0f} us   p99 {pct(times, 99) * 1e6:.0f} us")


# -- overhead --------------------------------------------------------------------------------------
def word_prompts(n: int, words: int, seed: int, shared_prefix: str = "") -> list[str]:
    """`n` distinct prompts of about `words` tokens (common words are one token each)."""
    rng = random.Random(seed)
    return [shared_prefix + " ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def _run_load(url: str, payloads: list[dict], concurrency: int, stream: bool) -> tuple[list[float], float]:
    """Send every payload once with `concurrency` workers; latency = to the first body byte (stream) or the end."""
    import aiohttp

    lat: list[float] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        for p in payloads[:concurrency]:  # warm up connections
            async with session.post(url + "/v1/completions", json=p) as r:
                await r.read()
        todo = iter(payloads[concurrency:])

        async def worker() -> None:
            for p in todo:
                t0 = time.perf_counter()
                async with session.post(url + "/v1/completions", json=p) as r:
                    if stream:
                        await r.content.readany()
                        lat.append(time.perf_counter() - t0)
                        await r.read()
                    else:
                        await r.read()
                        lat.append(time.perf_counter() - t0)
                    if r.status != 200:
                        raise RuntimeError(f"status {r.status}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return lat, len(lat) / elapsed


def _start_proc(args: list[str], ready: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if ready in line:
            for tok in line.split():
                if tok.startswith("http://"):
                    return p, tok.rstrip(",;)")
    p.kill()
    raise RuntimeError(f"{args} did not start")


def bench_overhead(args: argparse.Namespace) -> None:
    import psutil

    emu, emu_url = _start_proc(
        ["-m", "emulator", "--port", "0", "--profile", "zero", "--max-num-seqs", "1024", "--no-log-requests"], "http://"
    )
    prox, prox_url = _start_proc(
        ["-m", "proxy", "--port", "0", "--backend", emu_url, "--strategy", args.strategy, "--log-level", "warning"], "listening on"
    )
    try:
        proc = psutil.Process(prox.pid)
        print(f"backend {emu_url} (zero-latency emulator), proxy {prox_url} ({args.strategy}); "
              f"~{args.tokens}-token prompts, max_tokens {args.max_tokens}")
        doc = " ".join(word_prompts(1, args.tokens - 100, seed=7))
        rows = []
        seed = 100
        for label, stream, c, shared in (
            ("non-stream c=1", False, 1, False), ("stream TTFB c=1", True, 1, False),
            ("non-stream c=32", False, 32, False), ("stream TTFB c=32", True, 32, False),
            ("non-stream c=1 RAG", False, 1, True), ("stream TTFB c=32 RAG", True, 32, True),
        ):
            n = args.requests if c == 1 else args.requests * 4
            res = {}
            for name, url in (("direct", emu_url), ("proxy", prox_url)):
                seed += 1
                prompts = (word_prompts(n + c, 100, seed, doc + " ") if shared else word_prompts(n + c, args.tokens, seed))
                payloads = [{"prompt": t, "max_tokens": args.max_tokens, "stream": stream} for t in prompts]
                cpu0 = sum(proc.cpu_times()[:2])
                lat, thr = asyncio.run(_run_load(url, payloads, c, stream))
                cpu = sum(proc.cpu_times()[:2]) - cpu0
                res[name] = (lat, thr, cpu / (n + c))
            rows.append((label, res))
        print(f"{'mode':<22}{'direct p50':>11}{'proxy p50':>11}{'added p50':>11}{'added p99':>11}{'thr ratio':>11}{'proxy CPU/req':>15}")
        for label, res in rows:
            dl, dt, _ = res["direct"]
            pl, pt, pcpu = res["proxy"]
            print(f"{label:<22}{statistics.median(dl) * 1e3:>9.3f}ms{statistics.median(pl) * 1e3:>9.3f}ms"
                  f"{(statistics.median(pl) - statistics.median(dl)) * 1e3:>9.3f}ms{(pct(pl, 99) - pct(dl, 99)) * 1e3:>9.3f}ms"
                  f"{pt / dt:>10.2f}x{pcpu * 1e6:>12.0f} us")
        print("unique prompts unless RAG (one shared ~{0}-token document + a distinct 100-token question)".format(args.tokens - 100))
        print("targets: added p50 <= 0.5 ms at c=1; throughput >= 0.35x direct at c=32; CPU <= 300 us/request")
    finally:
        for p in (prox, emu):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


# -- edge ------------------------------------------------------------------------------------------
def _start_emulators(n: int) -> tuple[subprocess.Popen, list[str]]:
    """One zero-latency emulator process serving `n` replicas (one port each)."""
    from .common import start_process

    return start_process(["-m", "emulator", "--port", "0", "--replicas", str(n), "--profile", "zero",
                          "--max-num-seqs", "1024", "--no-log-requests"], "EMULATOR_URL", n)


async def _passthrough(backends: list[str]) -> None:
    """The A/B baseline: aiohttp's server and client relaying POSTs round-robin, nothing else."""
    import itertools

    import aiohttp
    from aiohttp import web

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    targets = itertools.cycle(backends)

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with session.post(next(targets) + request.path, data=body, headers={"Content-Type": "application/json"}) as r:
            if r.content_type != "text/event-stream":
                return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)
            resp = web.StreamResponse(status=r.status)
            resp.content_type = r.content_type
            await resp.prepare(request)
            async for chunk in r.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=8 << 20)
    app.router.add_post("/v1/completions", relay)
    app.router.add_post("/v1/chat/completions", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    print(f"passthrough listening on http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def edge_parse_costs(n: int = 20000) -> dict[str, float]:
    """CPU seconds per unit of the edge's parsing alone, in this process (no sockets, no other load):
    a client request head + body through `FrontProtocol`, a Content-Length answer and an SSE chunk
    through the upstream connection. The figures the front/upstream docstrings quote."""
    import orjson

    from proxy.edge import front
    from proxy.upstream import client as upstream

    class _Transport:
        def write(self, data: bytes) -> None: ...
        def close(self) -> None: ...
        def get_extra_info(self, name: str) -> None: ...
        def pause_reading(self) -> None: ...
        def resume_reading(self) -> None: ...

    class _Loop:  # the request is parsed and handed to a task; the task itself is not run
        def time(self) -> float:
            return 0.0

        def create_task(self, coro):
            coro.close()

    out: dict[str, float] = {}
    body = orjson.dumps({"prompt": "hello " * 100, "max_tokens": 8})
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: Python/3.11 aiohttp/3.14\r\n"
               b"Accept: */*\r\nAccept-Encoding: gzip, deflate\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    loop = asyncio.new_event_loop()
    try:
        server = front.FrontServer(None, None, 8 << 20, 8190)  # type: ignore[arg-type]
        server.loop = _Loop()  # type: ignore[assignment]
        conn = front.FrontProtocol(server)
        conn.connection_made(_Transport())  # type: ignore[arg-type]
        t0 = time.process_time()
        for _ in range(n):
            conn.data_received(request)
            conn.task = None
        out["front request"] = (time.process_time() - t0) / n
        answer = (b"HTTP/1.1 200 OK\r\ndate: Sun, 29 Nov 2026 10:00:00 GMT\r\nserver: uvicorn\r\n"
                  b"content-type: application/json\r\ncontent-length: 400\r\n\r\n" + b"x" * 400)
        up = upstream._Connection(loop)
        t0 = time.process_time()
        for _ in range(n):
            up.start()
            up.data_received(answer)
            up._chunks.clear()
        out["upstream answer"] = (time.process_time() - t0) / n
        event = b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"text":" a","index":0}]}\n\n'
        chunk = b"%x\r\n%b\r\n" % (len(event), event)
        up.start()
        up.data_received(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        t0 = time.process_time()
        for _ in range(n):
            up.data_received(chunk)
            up._chunks.clear()
        out["upstream SSE chunk"] = (time.process_time() - t0) / n
    finally:
        loop.close()
    return out


def bench_edge(args: argparse.Namespace) -> None:
    """kvroute (front door, upstream client, routing) against a bare aiohttp pass-through, both
    relaying to the same zero-latency backends in one run, interleaved round by round."""
    import psutil

    costs = edge_parse_costs()
    print("parsing alone (llhttp + the edge's checks, in-process): "
          + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in costs.items()))
    emu, urls = _start_emulators(args.backends)
    procs = [emu]
    try:
        backend_args = [a for u in urls for a in ("--backend", u)]
        prox, prox_url = _start_proc(["-m", "proxy", "--port", "0", *backend_args, "--strategy", args.strategy,
                                      "--log-level", "warning"], "listening on")
        procs.append(prox)
        aio, aio_url = _start_proc(["-m", "benchmarks.proxy_bench", "passthrough", *urls], "listening on")
        procs.append(aio)
        targets = {"kvroute": (prox_url, psutil.Process(prox.pid)), "aiohttp": (aio_url, psutil.Process(aio.pid))}
        print(f"{args.backends} zero-latency backends; kvroute ({args.strategy}) vs a bare aiohttp pass-through; "
              f"~{args.tokens}-token unique prompts, max_tokens {args.max_tokens}; {args.rounds} interleaved rounds")
        modes = (("non-stream c=1", False, 1), ("non-stream c=32", False, 32), ("stream c=32", True, 32))
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        seed = 500
        for _ in range(args.rounds):
            for label, stream, c in modes:
                n = args.requests if c > 1 else args.requests // 4
                for name, (url, proc) in targets.items():
                    seed += 1
                    payloads = [{"prompt": t, "max_tokens": args.max_tokens, "stream": stream}
                                for t in word_prompts(n + c, args.tokens, seed)]
                    cpu0 = sum(proc.cpu_times()[:2])
                    lat, _ = asyncio.run(_run_load(url, payloads, c, stream))
                    cpu = (sum(proc.cpu_times()[:2]) - cpu0) / (n + c)
                    results.setdefault((label, name), []).append((cpu, statistics.median(lat)))
        print(f"{'mode':<18}{'kvroute CPU/req':>17}{'aiohttp CPU/req':>17}{'CPU ratio':>11}"
              f"{'kvroute p50':>13}{'aiohttp p50':>13}{'p50 ratio':>11}")
        for label, _, _ in modes:
            k_cpu = statistics.median(r[0] for r in results[(label, "kvroute")])
            a_cpu = statistics.median(r[0] for r in results[(label, "aiohttp")])
            k_lat = statistics.median(r[1] for r in results[(label, "kvroute")])
            a_lat = statistics.median(r[1] for r in results[(label, "aiohttp")])
            print(f"{label:<18}{k_cpu * 1e6:>14.0f} us{a_cpu * 1e6:>14.0f} us{k_cpu / a_cpu:>10.2f}x"
                  f"{k_lat * 1e3:>10.3f} ms{a_lat * 1e3:>10.3f} ms{k_lat / a_lat:>10.2f}x")
        print("medians over rounds; CPU = server process user+sys per request; p50 = to the last byte "
              "(stream: to the first body byte); kvroute's figure includes routing, the pass-through's does none")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv: Sequence[str] | None = None) -> None:
    from kvblocks.cli import ArgumentParser

    # Every flag's help states its default; a mistake is one line, exit 2 (as for the main CLIs).
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = ArgumentParser(prog="python -m benchmarks.proxy_bench", formatter_class=fmt)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decide", help="routing-decision micro-benchmark", formatter_class=fmt)
    d.add_argument("--tokens", type=int, default=4096, help="prompt length in tokens")
    d.add_argument("--index-blocks", type=int, default=100_000, help="blocks already in the prefix index")
    d.add_argument("--backends", type=int, default=64, help="backends the index spreads them over")
    d.add_argument("--iterations", type=int, default=500, help="decisions timed")
    d.add_argument("--strategy", default="kv_aware", help="routing strategy")
    o = sub.add_parser("overhead", help="proxy latency/throughput/CPU vs a direct connection", formatter_class=fmt)
    o.add_argument("--tokens", type=int, default=1000, help="prompt length in tokens (each prompt unique)")
    o.add_argument("--max-tokens", type=int, default=8, help="output tokens per request")
    o.add_argument("--requests", type=int, default=1000, help="requests at concurrency 1 (x4 at concurrency 32)")
    o.add_argument("--strategy", default="kv_aware", help="routing strategy")
    e = sub.add_parser("edge", help="CPU and latency of kvroute's HTTP edge vs a bare aiohttp pass-through", formatter_class=fmt)
    e.add_argument("--backends", type=int, default=4, help="zero-latency emulators behind both")
    e.add_argument("--tokens", type=int, default=100, help="prompt length in tokens")
    e.add_argument("--max-tokens", type=int, default=8, help="output tokens per request")
    e.add_argument("--requests", type=int, default=1000, help="requests per round and mode")
    e.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    e.add_argument("--strategy", default="kv_aware", help="routing strategy")
    pt = sub.add_parser("passthrough", help=argparse.SUPPRESS)
    pt.add_argument("backends", nargs="+")
    from . import proxy_soak as soak

    soak.add_parser(sub)
    args = ap.parse_args(argv)
    if args.cmd == "decide":
        bench_decide(args)
    elif args.cmd == "edge":
        bench_edge(args)
    elif args.cmd == "passthrough":
        try:
            import uvloop
        except ImportError:
            asyncio.run(_passthrough(args.backends))
        else:
            uvloop.run(_passthrough(args.backends))
    elif args.cmd == "soak":
        soak.main(args)
    else:
        bench_overhead(args)


if __name__ == "__main__":
    main()
