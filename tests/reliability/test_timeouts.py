"""Connect, first-byte and idle-stream timeouts, each against a real misbehaving server on loopback."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import aiohttp
import openai
import pytest
from aiohttp import web

from emulator.config import EmulatorConfig
from emulator.server import STATE, start_emulators
from proxy.config import ProxyConfig
from proxy.app import start_proxy
from proxy.upstream.client import UpstreamPool

from .helpers import MODEL, TIME_SCALE, metric_samples, wait_for


async def test_connect_timeout_bounds_a_backend_that_never_accepts():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    addr = srv.getsockname()
    fillers = []
    for _ in range(4):  # fill the accept queue: further SYNs are dropped, so connecting hangs
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(addr)
        fillers.append(f)
    pool = UpstreamPool(connect_timeout=0.2, idle_timeout=None)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.post(f"http://127.0.0.1:{addr[1]}", "/v1/completions", b"{}", {})
        assert time.monotonic() - t0 < 2.0
    finally:
        pool.close()
        for f in fillers:
            f.close()
        srv.close()


async def test_hanging_backend_hits_first_byte_timeout_and_is_retried_elsewhere():
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False), 2)
    hang, good = ems
    from emulator.faults import FaultConfig

    hang.app[STATE].faults.config = FaultConfig(hang_rate=1.0)
    proxy = await start_proxy(ProxyConfig(
        port=0, backends=[hang.url, good.url], strategy="round_robin", time_scale=TIME_SCALE,
        first_byte_timeout=0.3, retries=1, retry_backoff=0.01, breaker_failures=100,
    ))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=10)
    try:
        for stream in (True, False, True, False):
            if stream:
                chunks = [c async for c in await client.completions.create(model=MODEL, prompt="wait for me", max_tokens=4, stream=True)]
                assert chunks[-1].choices[0].finish_reason == "length"
            else:
                r = await client.completions.create(model=MODEL, prompt="wait for me", max_tokens=4)
                assert r.choices[0].finish_reason == "length"
        assert hang.app[STATE].faults.counts["hang"] >= 2
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/metrics") as r:
                retries = metric_samples(await r.text(), "kvroute_retries_total")
        assert retries[(("reason", "timeout"),)] >= 2
        # The proxy hung up on the hanging backend, whose handlers therefore ended.
        assert hang.app[STATE].faults.counts["hang"] >= 2
        await wait_for(lambda: hang.app[STATE].faults.hanging == 0, what="hung handlers to end")
    finally:
        await client.close()
        await proxy.stop()
        for e in ems:
            await e.stop()


async def _stalling_server() -> tuple[web.AppRunner, str, asyncio.Event]:
    """Answers a stream with one SSE event, then goes silent until the client leaves."""
    left = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
                         b'"choices":[{"index":0,"text":"Hi","logprobs":null,"finish_reason":null}]}\n\n')
        try:
            await asyncio.Event().wait()
        finally:
            left.set()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", stall)
    app.router.add_get("/health", lambda r: web.Response())
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", left


async def test_idle_stream_ends_with_an_sse_error_event():
    runner, url, left = await _stalling_server()
    proxy = await start_proxy(ProxyConfig(port=0, backends=[url], idle_timeout=0.3, time_scale=TIME_SCALE))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=10)
    try:
        got = []
        with pytest.raises(openai.APIError, match="stalled"):
            async for c in await client.completions.create(model="m", prompt="hello", max_tokens=4, stream=True):
                got.append(c.choices[0].text)
        assert got == ["Hi"]
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.url + "/v1/completions", json={"prompt": "x", "stream": True}) as r:
                body = await r.read()
        assert body.endswith(b"\n\ndata: [DONE]\n\n") and b'"code":504' in body
        await asyncio.wait_for(left.wait(), 5)  # the proxy dropped the stalled upstream connection
        await wait_for(lambda: proxy.router.registry.total_in_flight() == 0, what="in-flight back to zero")
    finally:
        await client.close()
        await proxy.stop()
        with contextlib.suppress(Exception):
            await runner.cleanup()
