"""`python -m benchmarks.emulator_bench`: does one emulator core keep its timings under many concurrent streams?

Runs one emulator process (pinned to one core) and, in another process, ramps concurrent streaming
clients. For each level it compares what clients measured (TTFT, time per output token) with what
the emulator's own step formula predicted for exactly those requests (its vLLM histograms, in
emulated seconds x time scale). A ratio of 1.00 means the HTTP path added nothing; the report names
the highest concurrency whose ratios stay within the tolerance.

`--long-prompt-ttft` instead runs the batched engine on a virtual clock (no HTTP, no sleeping) and
reports the emulated TTFT of one long prompt arriving while N streams decode, with vLLM's chunked
prefill (the step token budget) and with the whole prompt in one step.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import psutil

MODEL = "meta-llama/Llama-2-13b-hf"


# --- client side (runs in its own process) -------------------------------------------------------
@dataclass
class StreamResult:
    ttft: float
    tpot: float | None
    tokens: int


async def _one_stream(session, url: str, prompt: str, max_tokens: int) -> StreamResult:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            # Cheap byte checks instead of JSON parsing keep the client from being the bottleneck:
            # a token chunk has a non-empty "text"; the usage chunk has empty "choices".
            if not line.startswith(b"data: {") or b'"text":""' in line or b'"choices":[]' in line:
                continue
            now = time.perf_counter()
            n += 1
            if first is None:
                first = now
            last = now
    if first is None or last is None:
        raise RuntimeError("stream produced no tokens")
    return StreamResult(first - t0, (last - first) / (n - 1) if n > 1 else None, n)


async def run_clients(url: str, concurrency: int, requests_per_client: int, max_tokens: int, prompt_words: int,
                      ramp_s: float, seed: int) -> list[StreamResult]:
    import aiohttp

    rng = random.Random(seed)
    words = "alpha beta gamma delta kappa sigma omega river stone cloud forest light ember frost".split()
    results: list[StreamResult] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def warm_up() -> None:  # open every connection first, so TCP setup is not counted as TTFT
            async with session.get(url + "/health") as r:
                await r.read()

        await asyncio.gather(*(warm_up() for _ in range(concurrency)))

        async def worker(i: int) -> None:
            await asyncio.sleep(ramp_s * i / concurrency)
            for _ in range(requests_per_client):
                prompt = f"{seed}-{i}-{rng.random()} " + " ".join(rng.choice(words) for _ in range(prompt_words))
                results.append(await _one_stream(session, url, prompt, max_tokens))

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return results


def client_main(args: argparse.Namespace) -> None:
    _pin(args.cpu)
    runner = _runner()
    cpu0, wall0 = time.process_time(), time.monotonic()
    res = runner(run_clients(args.url, args.concurrency, args.requests_per_client, args.max_tokens,
                             args.prompt_words, args.ramp, args.seed))
    cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    json.dump({"cpu": cpu, "results": [r.__dict__ for r in res]}, sys.stdout)


# --- driver -----------------------------------------------------------------------------------
def _runner():
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass


def _pick_cpus() -> tuple[int | None, int | None]:
    """The idlest allowed core for the emulator and the next idlest for the clients (shared hosts)."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    allowed = sorted(os.sched_getaffinity(0))
    load = psutil.cpu_percent(interval=0.5, percpu=True)
    ranked = sorted(allowed, key=lambda c: load[c] if c < len(load) else 100.0)
    return ranked[0], (ranked[1] if len(ranked) > 1 else None)


def scrape(url: str) -> dict[str, float]:
    """The emulator's TTFT and TPOT histogram sums/counts (emulated seconds)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith(("_sum", "_count")):
                out[s.name] = s.value
    return out


def main(argv: list[str] | None = None) -> int:
    from kvblocks.cli import ArgumentParser

    p = ArgumentParser(prog="python -m benchmarks.emulator_bench", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--levels", default="100,250,500,750", help="concurrent streams per level")
    p.add_argument("--time-scale", type=float, default=1.0, help="emulator time scale (1.0 = real A100 timing)")
    p.add_argument("--max-tokens", type=int, default=48, help="output tokens per request")
    p.add_argument("--prompt-words", type=int, default=100, help="prompt length in words")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends in turn")
    p.add_argument("--min-requests", type=int, default=20, help="at least this many requests per level")
    p.add_argument("--ramp", type=float, default=2.0, help="seconds over which a level's clients start")
    p.add_argument("--tolerance", type=float, default=0.05, help="max |measured/predicted - 1| to pass")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop starting new levels after this")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="emulator step token budget (default: the emulator's, 2048); prompts beyond it are chunked")
    p.add_argument("--long-prompt-ttft", action="store_true",
                   help="report a long prompt's TTFT under decode load on a virtual clock (no HTTP)")
    p.add_argument("--long-prompt-tokens", type=int, default=4000, help="with --long-prompt-ttft: its length")
    p.add_argument("--load-levels", default="0,32,128,256", help="with --long-prompt-ttft: decoding streams")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        client_main(args)
        return 0
    if args.long_prompt_ttft:
        return long_prompt_main(args)

    levels = [int(x) for x in args.levels.split(",") if x]
    emu_cpu, client_cpu = _pick_cpus()
    emu = subprocess.Popen(
        [sys.executable, "-m", "emulator", "--port", "0", "--no-log-requests", "--time-scale", str(args.time_scale),
         "--max-num-seqs", str(max(levels)),
         # room for every stream's prompt (~1.5 tokens a word) and output: timing, not preemption, is measured
         "--num-gpu-blocks", str(max(levels) * (-(-(args.prompt_words * 3 // 2 + args.max_tokens) // 16) + 4) + 1024)]
        + (["--max-num-batched-tokens", str(args.max_num_batched_tokens or max(levels))]
           if args.max_num_batched_tokens or max(levels) > 2048 else []),  # vLLM needs budget >= max_num_seqs
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        if emu_cpu is not None:
            os.sched_setaffinity(emu.pid, {emu_cpu})
        line = emu.stdout.readline() if emu.stdout else ""
        if not line.startswith("EMULATOR_URL "):
            print("emulator did not start", file=sys.stderr)
            return 1
        url = line.split()[1]
        print(f"emulator {url} pinned to cpu {emu_cpu}, clients on cpu {client_cpu} (host load avg "
              f"{os.getloadavg()[0]:.1f}); time_scale={args.time_scale}, "
              f"{args.max_tokens} output tokens/request, {args.requests_per_client} requests per client, "
              f"max_num_batched_tokens={args.max_num_batched_tokens or 'default (2048)'}")
        print(f"{'streams':>8} {'reqs':>6} {'TTFT ms meas/pred':>20} {'ratio':>6} {'TPOT ms meas/pred':>20} {'ratio':>6}"
              f" {'late ms':>8} {'emu CPU':>8} {'cli CPU':>8}  ok")
        proc = psutil.Process(emu.pid)
        best = 0
        t_start = time.monotonic()
        for level in levels:
            if time.monotonic() - t_start > args.max_seconds:
                print(f"stopping: --max-seconds {args.max_seconds} reached")
                break
            before = scrape(url)
            cpu0, wall0 = sum(proc.cpu_times()[:2]), time.monotonic()
            per_client = max(args.requests_per_client, -(-args.min_requests // level))
            cmd = [sys.executable, "-m", "benchmarks.emulator_bench", "--client", "--url", url, "--concurrency", str(level),
                   "--requests-per-client", str(per_client), "--max-tokens", str(args.max_tokens),
                   "--prompt-words", str(args.prompt_words), "--ramp", str(args.ramp), "--seed", str(args.seed + level)]
            if client_cpu is not None:
                cmd += ["--cpu", str(client_cpu)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.max_seconds + 120)
            if out.returncode != 0:
                print(f"{level:>8} client failed: {out.stderr.strip()[-300:]}")
                break
            client = json.loads(out.stdout)
            res = client["results"]
            after = scrape(url)
            cpu = (sum(proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - wall0)
            row = _compare(res, before, after, args.time_scale)
            ok = abs(row["ttft_ratio"] - 1) <= args.tolerance and abs(row["tpot_ratio"] - 1) <= args.tolerance
            best = level if ok else best
            print(f"{level:>8} {len(res):>6} {row['ttft_meas']*1e3:>9.1f}/{row['ttft_pred']*1e3:<9.1f} "
                  f"{row['ttft_ratio']:>6.3f} {row['tpot_meas']*1e3:>9.2f}/{row['tpot_pred']*1e3:<9.2f} "
                  f"{row['tpot_ratio']:>6.3f} {row['late_ms']:>8.2f} {cpu:>8.0%} {client['cpu']:>8.0%}  {'yes' if ok else 'NO'}")
        print(f"highest concurrency within {args.tolerance:.0%}: {best or 'none'}")
    finally:
        emu.terminate()
        try:
            emu.wait(timeout=10)
        except subprocess.TimeoutExpired:
            emu.kill()
    return 0


def _compare(res: list[dict], before: dict[str, float], after: dict[str, float], scale: float) -> dict[str, float]:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    ttft_pred = delta("vllm:time_to_first_token_seconds_sum") / max(1.0, delta("vllm:time_to_first_token_seconds_count")) * scale
    tpot_pred = (delta("vllm:request_time_per_output_token_seconds_sum")
                 / max(1.0, delta("vllm:request_time_per_output_token_seconds_count")) * scale)
    late_ms = 1e3 * delta("kvroute:emulator_step_lateness_seconds_sum") / max(
        1.0, delta("kvroute:emulator_step_lateness_seconds_count"))
    ttft_meas = sum(r["ttft"] for r in res) / len(res)
    tpots = [r["tpot"] for r in res if r["tpot"] is not None]
    tpot_meas = sum(tpots) / max(1, len(tpots))
    return {
        "late_ms": late_ms,
        "ttft_meas": ttft_meas, "ttft_pred": ttft_pred, "ttft_ratio": ttft_meas / ttft_pred if ttft_pred else float("inf"),
        "tpot_meas": tpot_meas, "tpot_pred": tpot_pred, "tpot_ratio": tpot_meas / tpot_pred if tpot_pred else float("inf"),
    }


# --- a long prompt under load, on a virtual clock --------------------------------------------------
def _virtual_clock_engine(budget: int, max_num_seqs: int, num_gpu_blocks: int):
    """The batched engine whose clock only moves by step durations: a deterministic simulation."""
    from emulator.config import EmulatorConfig
    from emulator.engine import BatchedEngine

    class VirtualClockEngine(BatchedEngine):
        def emu_now(self) -> float:
            return self._clock

        async def sleep_until(self, emu_t: float) -> None:
            await asyncio.sleep(0)

    cfg = EmulatorConfig(port=0, log_requests=False, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                         num_gpu_blocks=num_gpu_blocks)
    return VirtualClockEngine(cfg)


async def long_prompt_ttft(load: int, prompt_tokens: int, budget: int, seed: int = 0) -> dict[str, float]:
    """Emulated TTFT of one `prompt_tokens` prompt arriving while `load` streams decode, and the
    longest gap those streams saw while it was prefilled."""
    import contextlib

    from emulator.request import SamplingParams

    eng = _virtual_clock_engine(budget, max(256, load + 1), num_gpu_blocks=load * 64 + prompt_tokens // 16 + 256)
    rng = random.Random(seed)
    streams = [eng.make_request(f"s{i}", [rng.randrange(1000, 90000) for _ in range(200)],
                                SamplingParams(max_tokens=600, ignore_eos=True)) for i in range(load)]

    async def drain(req) -> None:
        async with contextlib.aclosing(eng.generate(req)) as gen:
            async for _ in gen:
                pass

    tasks = [asyncio.ensure_future(drain(r)) for r in streams]
    while any(r.timings.first_token is None for r in streams):
        await asyncio.sleep(0)
    long = eng.make_request("long", [rng.randrange(1000, 90000) for _ in range(prompt_tokens)],
                            SamplingParams(max_tokens=1))
    await drain(long)
    t0, t1 = long.timings.arrival, long.timings.first_token
    gaps = [b - a for r in streams for a, b in zip(r.token_times, r.token_times[1:]) if a >= t0 - 1e-12 and b <= t1 + 0.1]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"ttft": long.timings.ttft, "max_gap": max(gaps, default=0.0), "steps": eng.num_steps}


def long_prompt_main(args: argparse.Namespace) -> int:
    budget = args.max_num_batched_tokens or 2048
    one_step = max(budget, args.long_prompt_tokens + 1024)
    print(f"emulated TTFT of one {args.long_prompt_tokens}-token prompt arriving while N streams decode "
          f"(profile a100-40gb-llama2-13b, virtual clock; 'max stall' = the longest gap between two tokens "
          f"of a decoding stream while the prompt was prefilled)")
    print(f"{'decoding':>8} {'TTFT s, chunked ' + str(budget):>22} {'max stall s':>12} "
          f"{'TTFT s, one step':>17} {'max stall s':>12}")
    for load in [int(x) for x in args.load_levels.split(",") if x]:
        chunked = asyncio.run(long_prompt_ttft(load, args.long_prompt_tokens, budget, args.seed))
        whole = asyncio.run(long_prompt_ttft(load, args.long_prompt_tokens, one_step, args.seed))
        print(f"{load:>8} {chunked['ttft']:>22.3f} {chunked['max_gap']:>12.3f} {whole['ttft']:>17.3f} "
              f"{whole['max_gap']:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
