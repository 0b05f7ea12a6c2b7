"""Chaos: faulty emulators behind the proxy, many concurrent clients, nothing lost, nothing leaked.

Five emulators misbehave in different ways (5xx, cut streams, hangs, latency spikes, a crash);
200 requests (streaming and not, completions and chat, some abandoned mid-stream by their client)
go through the proxy with the real openai SDK. Every request must end as exactly one of: complete
(the full max_tokens and a finish reason), a clear error (HTTP status, or an SSE error event the
SDK raises), or a deliberate client disconnect. Afterwards the proxy's in-flight gauges and every
emulator's referenced KV blocks return to zero.
"""
from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import replace

import aiohttp
import openai
import pytest

from emulator.config import EmulatorConfig
from emulator.server import STATE, start_emulator
from proxy.config import ProxyConfig
from proxy.app import start_proxy

from .helpers import MODEL, engines_idle, metric_samples, wait_for, wait_for_async

N_REQUESTS = 200
CONCURRENCY = 40
MAX_TOKENS = 12
TIME_SCALE = 0.005

FAULTS = [
    dict(fault_error_rate=0.3),
    dict(fault_cut_after=5, fault_cut_rate=0.3),
    dict(fault_hang_rate=0.2),
    dict(fault_latency_spike_rate=0.3, fault_latency_spike=0.2),
    dict(fault_crash_after=25),
]


@pytest.fixture
async def chaos_stack():
    base = EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False, seed=11)
    ems = [await start_emulator(replace(base, **f)) for f in FAULTS]
    proxy = await start_proxy(ProxyConfig(
        port=0, backends=[e.url for e in ems], strategy="round_robin", time_scale=TIME_SCALE, health_interval=0.2,
        metrics_interval=0.2, retries=2, retry_backoff=0.01, retry_backoff_max=0.05, first_byte_timeout=0.5,
        idle_timeout=2.0, breaker_failures=4, breaker_cooldown=0.3,
    ))
    yield proxy, ems
    await proxy.stop()
    for e in ems:
        await e.stop()


async def one_request(i: int, client: openai.AsyncOpenAI, session: aiohttp.ClientSession, url: str) -> str:
    """Send request `i`; returns "complete", "error" or "disconnect" - and asserts nothing was silently cut."""
    rng = random.Random(i)
    chat = rng.random() < 0.4
    stream = rng.random() < 0.6
    prompt = f"request {i}: " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(20, 120)))
    if stream and rng.random() < 0.15:  # a client that reads a little and leaves
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"model": MODEL, "max_tokens": 400, "stream": True,
                **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
        async with session.post(url + path, json=body) as r:
            if r.status != 200:
                return "error"
            await r.content.readany()
        return "disconnect"
    try:
        if chat:
            kw = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS)
            if stream:
                finish, n = None, 0
                async for c in await client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
                    if c.choices:
                        finish = c.choices[0].finish_reason or finish
                    if c.usage is not None:
                        n = c.usage.completion_tokens
                assert finish == "length" and n == MAX_TOKENS, (finish, n)
            else:
                r = await client.chat.completions.create(**kw)
                assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == MAX_TOKENS
        else:
            kw = dict(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS)
            if stream:
                finish, n = None, 0
                async for c in await client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
                    if c.choices:
                        finish = c.choices[0].finish_reason or finish
                    if c.usage is not None:
                        n = c.usage.completion_tokens
                assert finish == "length" and n == MAX_TOKENS, (finish, n)
            else:
                r = await client.completions.create(**kw)
                assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == MAX_TOKENS
    except openai.APIError:
        return "error"
    return "complete"


async def test_chaos_every_request_is_accounted_for_and_nothing_leaks(chaos_stack):
    proxy, ems = chaos_stack
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=15)
    sem = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        async def bounded(i: int) -> str:
            async with sem:
                return await one_request(i, client, session, proxy.url)

        outcomes = await asyncio.gather(*(bounded(i) for i in range(N_REQUESTS)), return_exceptions=True)
        unexpected = [o for o in outcomes if not isinstance(o, str)]
        assert not unexpected, unexpected[:3]  # includes any silently truncated "success"
        counts = Counter(outcomes)
        assert sum(counts.values()) == N_REQUESTS
        assert counts["complete"] + counts["error"] + counts["disconnect"] == N_REQUESTS, counts
        assert counts["complete"] >= N_REQUESTS * 0.6, counts  # retries and the breaker keep most requests whole
        assert counts["disconnect"] > 0 and counts["error"] > 0, counts  # cut streams surfaced as errors

        injected = Counter()
        for e in ems:
            injected.update({k: v for k, v in e.app[STATE].faults.counts.items() if v})
        assert {"error", "cut", "hang", "spike", "crash"} <= set(injected), injected

        async def gauges_zero() -> bool:
            async with session.get(proxy.url + "/metrics") as r:
                text = await r.text()
            backends = metric_samples(text, "kvroute_backend_in_flight")
            total = metric_samples(text, "kvroute_requests_in_flight")[()]
            return total == 0 and len(backends) == len(ems) and all(v == 0 for v in backends.values())

        await wait_for_async(gauges_zero, timeout=10, what="proxy in-flight gauges back to zero")
    await wait_for(lambda: engines_idle(ems), timeout=10, what="every emulator's referenced blocks back to zero")
    await wait_for(lambda: all(e.app[STATE].faults.hanging == 0 for e in ems), timeout=10, what="hung handlers ended")
    await client.close()
