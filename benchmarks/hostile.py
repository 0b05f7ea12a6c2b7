"""The hostile-input classes of issue #24, measured against a real `python -m proxy` (loopback only).

`python -m benchmarks.hostile CLASS [--repo DIR]` starts the proxy from DIR's code (default: this
checkout, so the same command measures an older commit's worktree), a fake backend or an emulator
in their own processes, drives the class's clients and prints its figures:
- slowloris: N connections each send one `GET /health`, then the start of a second head, and stall;
  how many the proxy cuts within 5 x --client-read-timeout.
- stalled: N chunked request bodies of 8 MB that stop before their last chunk; the proxy's RSS and
  in-flight gauge while they stall and after 5 x --client-read-timeout.
- big: N concurrent non-streamed 60 MB answers; the proxy's RSS before, at peak (VmHWM) and after.
- cut: a backend whose usage.prompt_tokens has 5,000 digits; whether a stream still ends with an
  error or usage event, [DONE] and the terminating chunk, and whether a non-streamed answer arrives.
- fair: a small request's latency alone, then beside 4 clients looping on the most expensive inputs
  (a 1.5M-id list, a 200k-message chat, a text just under the body limit, a text near the context).
Every figure is from this run; ratios compare runs of the same invocation.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20


# -- processes -----------------------------------------------------------------------------------
def start(args: list[str], ready: str, cwd: str) -> tuple[subprocess.Popen, str]:
    """`python ARGS` in `cwd`; the first http:// URL on a line containing `ready`."""
    env = {**os.environ, "PYTHONPATH": cwd}
    p = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if ready in line:
            return p, next(t.rstrip(",;)") for t in line.split() if t.startswith("http://"))
    p.kill()
    raise RuntimeError(f"{' '.join(args)} did not start")


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of `pid` in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024
    return out["VmRSS"], out["VmHWM"]


def host_port(url: str) -> tuple[str, int]:
    h, p = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    return h, int(p)


# -- a fake backend: sane GETs, and POST answers chosen by --mode -----------------------------------
async def fake_backend(mode: str, size: int) -> None:
    models = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 4096}]}).encode()
    big = b'{"id":"x","object":"text_completion","choices":[{"index":0,"text":"' + b"a" * size + b'"}],"usage":{"prompt_tokens":5}}'
    digits = b"9" * 5000
    absurd_stream = (b'data: {"id":"x","choices":[{"index":0,"text":"hi"}]}\n\n'
                     b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":' + digits + b',"completion_tokens":1}}\n\n'
                     b"data: [DONE]\n\n")
    absurd_json = b'{"id":"x","choices":[{"index":0,"text":"hi"}],"usage":{"prompt_tokens":' + digits + b"}}"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if head.startswith(b"GET /v1/models"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                                 % (len(models), models))
                elif head.startswith(b"GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                elif mode == "big":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                                 % len(big))
                    for i in range(0, len(big), MB):
                        writer.write(big[i:i + MB])
                        await writer.drain()
                elif b'"stream": true' in body or b'"stream":true' in body:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for event in absurd_stream.split(b"\n\n")[:-1]:
                        e = event + b"\n\n"
                        writer.write(b"%x\r\n%b\r\n" % (len(e), e))
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                                 % (len(absurd_json), absurd_json))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"FAKE_BACKEND http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


# -- raw HTTP helpers ------------------------------------------------------------------------------
async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, head, bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return status, head, await reader.readexactly(length)


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%b\r\n%b"
            % (path.encode(), len(body), extra, body))


async def in_flight(host: str, port: int) -> float | None:
    try:
        r, w = await asyncio.open_connection(host, port)
        w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        _, _, body = await asyncio.wait_for(read_response(r), 10)
        w.close()
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return None
    for line in body.decode().splitlines():
        if line.startswith("kvroute_requests_in_flight "):
            return float(line.split()[1])
    return None


# -- the classes -----------------------------------------------------------------------------------
async def slowloris(host: str, port: int, n: int, timeout: float) -> dict:
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection(host, port)
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        conns.append((r, w))
    for r, w in conns:
        await asyncio.wait_for(read_response(r), 30)
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # ...and never the rest
    t0 = time.monotonic()

    async def closed(r: asyncio.StreamReader) -> float | None:
        try:
            await asyncio.wait_for(r.read(), 5 * timeout)
            return time.monotonic() - t0
        except (asyncio.TimeoutError, ConnectionError):
            return None

    times = await asyncio.gather(*(closed(r) for r, _ in conns))
    for _, w in conns:
        w.close()
    cut = [t for t in times if t is not None]
    return {"connections": n, "cut": len(cut), "cut_after_s_max": round(max(cut), 2) if cut else None,
            "waited_s": 5 * timeout}


async def stalled(host: str, port: int, pid: int, n: int, timeout: float) -> dict:
    base = rss_mb(pid)[0]
    part = b"%x\r\n%b\r\n" % (MB, b'{"prompt": "' + b"a" * (MB - 12))
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection(host, port)
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(7):
            w.write(part)
            await w.drain()
        conns.append((r, w))
    await asyncio.sleep(min(1.0, timeout / 2))  # a measuring point while they stall, not a synchronisation
    during = rss_mb(pid)[0], await in_flight(host, port)
    deadline = time.monotonic() + 5 * timeout
    cut = 0
    for r, _ in conns:
        try:
            await asyncio.wait_for(r.read(), max(0.01, deadline - time.monotonic()))
            cut += 1
        except (asyncio.TimeoutError, ConnectionError):
            pass
    after = rss_mb(pid)[0], await in_flight(host, port)
    for _, w in conns:
        w.close()
    return {"bodies": n, "body_mb_sent": 7, "rss_base_mb": round(base), "rss_stalled_mb": round(during[0]),
            "in_flight_stalled": during[1], "cut_within_s": 5 * timeout, "cut": cut,
            "rss_after_mb": round(after[0]), "in_flight_after": after[1]}


async def big(host: str, port: int, pid: int, n: int) -> dict:
    base = rss_mb(pid)[0]
    peak = [base]
    body = json.dumps({"prompt": "hello", "max_tokens": 1}).encode()

    async def one() -> int:
        r, w = await asyncio.open_connection(host, port, limit=4 * MB)
        w.write(post("/v1/completions", body, b"Connection: close\r\n"))
        got = 0
        head = await r.readuntil(b"\r\n\r\n")
        while chunk := await r.read(MB):
            got += len(chunk)
        w.close()
        return got if head.startswith(b"HTTP/1.1 200") else -got

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_mb(pid)[0])
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    sizes = await asyncio.gather(*(one() for _ in range(n)))
    elapsed = time.monotonic() - t0
    sampler.cancel()
    after = rss_mb(pid)
    return {"answers": n, "answer_mb": round(sizes[0] / MB, 1), "all_200": all(s > 0 for s in sizes),
            "rss_base_mb": round(base), "rss_peak_sampled_mb": round(peak[0]), "rss_hwm_mb": round(after[1]),
            "rss_after_mb": round(after[0]), "seconds": round(elapsed, 2)}


async def cut(host: str, port: int) -> dict:
    out = {}
    for stream in (True, False):
        body = json.dumps({"prompt": "hello there", "max_tokens": 2, "stream": stream}).encode()
        r, w = await asyncio.open_connection(host, port)
        w.write(post("/v1/completions", body))
        try:
            status, head, data = await asyncio.wait_for(read_response(r), 10)
            ok = status == 200 and (b"data: [DONE]" in data if stream else data.startswith(b"{"))
            out["stream" if stream else "non_stream"] = "complete" if ok else f"status {status}"
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            out["stream" if stream else "non_stream"] = f"cut ({type(e).__name__})"
        w.close()
    return out


EXPENSIVE = {
    "ids_1.5M": lambda: json.dumps({"prompt": [1000 + i % 9000 for i in range(1_500_000)], "max_tokens": 5},
                                   separators=(",", ":")).encode(),  # 7.5 MB
    "chat_200k": lambda: json.dumps({"messages": [{"role": "user", "content": "hi"}] * 200_000, "max_tokens": 5}).encode(),
    "text_7.9MB": lambda: json.dumps({"prompt": "word " * (7_900_000 // 5), "max_tokens": 5}).encode(),
    "text_near_context": lambda: json.dumps({"prompt": "lorem ipsum dolor " * 1300, "max_tokens": 5}).encode(),
}


async def attacker(host: str, port: int, body: bytes, stop_at: float, counts: dict, name: str) -> None:
    r = w = None
    while time.monotonic() < stop_at:
        try:
            if w is None:
                r, w = await asyncio.open_connection(host, port, limit=4 * MB)
            w.write(post("/v1/completions" if "chat" not in name else "/v1/chat/completions", body))
            status, _, _ = await read_response(r)
            counts[name] = counts.get(name, 0) + 1
            counts[f"{name}_status"] = status
        except (ConnectionError, asyncio.IncompleteReadError):
            w = None


async def fair(host: str, port: int, n: int, seconds: float) -> dict:
    small = json.dumps({"prompt": "the quick brown fox", "max_tokens": 1}).encode()
    r, w = await asyncio.open_connection(host, port)

    async def measure(k: int) -> list[float]:
        out = []
        for _ in range(k):
            t = time.perf_counter()
            w.write(post("/v1/completions", small))
            status, _, _ = await read_response(r)
            assert status == 200, status
            out.append((time.perf_counter() - t) * 1000)
        return out

    await measure(5)
    alone = await measure(n)
    bodies = {name: make() for name, make in EXPENSIVE.items()}
    counts: dict = {}
    stop_at = time.monotonic() + seconds
    attackers = [asyncio.create_task(attacker(host, port, body, stop_at, counts, name)) for name, body in bodies.items()]
    await asyncio.sleep(0.5)  # let the attackers get going (a warm-up, not a synchronisation)
    beside = []
    while time.monotonic() < stop_at and len(beside) < n:
        beside += await measure(1)
    await asyncio.gather(*attackers)
    w.close()

    def stats(xs: list[float]) -> dict:
        xs = sorted(xs)
        return {"n": len(xs), "median_ms": round(statistics.median(xs), 1), "p95_ms": round(xs[int(0.95 * (len(xs) - 1))], 1),
                "max_ms": round(xs[-1], 1)}

    a, b = stats(alone), stats(beside)
    return {"alone": a, "beside_4_expensive": b, "median_ratio": round(b["median_ms"] / a["median_ms"], 1),
            "expensive_answers": counts}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("slowloris", "stalled", "big", "cut", "fair", "fake-backend"))
    p.add_argument("--repo", default=ROOT, help="checkout whose proxy is measured (default: this one)")
    p.add_argument("-n", type=int, default=None, help="connections / bodies / answers / samples")
    p.add_argument("--timeout", type=float, default=2.0, help="the proxy's --client-read-timeout")
    p.add_argument("--mode", default="big", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=60 * MB, help="answer size for `big` (bytes)")
    p.add_argument("--seconds", type=float, default=15.0, help="how long `fair` runs its attackers")
    a = p.parse_args(argv)
    if a.what == "fake-backend":
        asyncio.run(fake_backend(a.mode, a.size))
        return
    procs = []
    try:
        extra = ["--client-read-timeout", str(a.timeout)]
        if a.what in ("big", "cut"):
            fb, url = start(["-m", "benchmarks.hostile", "fake-backend", "--mode", "big" if a.what == "big" else "absurd",
                             "--size", str(a.size)], "FAKE_BACKEND", ROOT)
            procs.append(fb)
            extra += ["--backend", url, "--max-response-bytes", str(a.size + MB), "--retries", "0"]
        else:
            em, url = start(["-m", "emulator", "--port", "0", "--time-scale", "0.001"], "EMULATOR_URL", a.repo)
            procs.append(em)
            extra += ["--backend", url]
        proxy, purl = start(["-m", "proxy", "--port", "0", "--health-interval", "5", *extra], "listening on", a.repo)
        procs.append(proxy)
        host, port = host_port(purl)
        if a.what == "slowloris":
            res = asyncio.run(slowloris(host, port, a.n or 500, a.timeout))
        elif a.what == "stalled":
            res = asyncio.run(stalled(host, port, proxy.pid, a.n or 40, a.timeout))
        elif a.what == "big":
            res = asyncio.run(big(host, port, proxy.pid, a.n or 8))
        elif a.what == "cut":
            res = asyncio.run(cut(host, port))
        else:
            res = asyncio.run(fair(host, port, a.n or 200, a.seconds))
        print(json.dumps({"class": a.what, "repo": os.path.abspath(a.repo), **res}))
    finally:
        for pr in reversed(procs):
            stop(pr)


if __name__ == "__main__":
    main()
