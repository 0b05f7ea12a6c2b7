"""Retries: only before the first byte, bounded by --retries, spaced by exponential backoff with jitter."""
from __future__ import annotations

import random

import aiohttp

from emulator.config import EmulatorConfig
from emulator.server import STATE, start_emulators
from proxy.config import ProxyConfig
from proxy.upstream.forward import backoff_delay
from proxy.app import start_proxy

from .helpers import MODEL, TIME_SCALE


def test_backoff_doubles_is_capped_and_jittered():
    rng = random.Random(1)
    for retry, d in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        xs = [backoff_delay(retry, 0.1, 0.5, rng) for _ in range(200)]
        assert all(d / 2 <= x <= d for x in xs) and len(set(xs)) > 100


async def test_attempts_are_bounded_by_retries_and_the_last_5xx_is_passed_through():
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False, fault_error_rate=1.0), 3)
    try:
        for retries in (0, 2, 5):
            proxy = await start_proxy(ProxyConfig(
                port=0, backends=[e.url for e in ems], time_scale=TIME_SCALE, retries=retries, retry_backoff=0.001,
                breaker_failures=1000,
            ))
            before = sum(e.app[STATE].faults.counts["error"] for e in ems)
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.post(proxy.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}) as r:
                        assert r.status == 503
                        assert (await r.json())["error"]["code"] == 503
            finally:
                await proxy.stop()
            attempts = sum(e.app[STATE].faults.counts["error"] for e in ems) - before
            assert attempts == min(1 + retries, len(ems))  # never the same backend twice for one request
    finally:
        for e in ems:
            await e.stop()


async def test_a_stream_is_never_retried_after_its_first_byte():
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False, fault_cut_after=2), 2)
    proxy = await start_proxy(ProxyConfig(port=0, backends=[e.url for e in ems], time_scale=TIME_SCALE, retries=3))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.url + "/v1/completions",
                              json={"model": MODEL, "prompt": "hi", "max_tokens": 8, "stream": True}) as r:
                body = await r.read()
        assert body.count(b'"text"') == 2 and b"connection lost" in body and body.endswith(b"data: [DONE]\n\n")
        assert sum(e.app[STATE].faults.counts["cut"] for e in ems) == 1
        assert sum(b.processed for b in proxy.router.registry) == 1
    finally:
        await proxy.stop()
        for e in ems:
            await e.stop()
