"""The circuit breaker: its state machine on a fake clock, then through a real proxy and emulators."""
from __future__ import annotations

import aiohttp
import openai

from emulator.config import EmulatorConfig
from emulator.faults import FaultConfig
from emulator.server import STATE, start_emulators
from proxy.backends.circuit_breaker import BreakerState, CircuitBreaker
from proxy.config import ProxyConfig
from proxy.app import start_proxy

from .helpers import MODEL, TIME_SCALE, metric_samples, wait_for, wait_for_async


def test_opens_after_consecutive_failures_probes_after_cooldown_and_closes_after_successes():
    now = [0.0]
    br = CircuitBreaker(failure_threshold=3, cooldown=10.0, success_threshold=2, clock=lambda: now[0])
    for _ in range(2):
        br.failure(br.attempt())
    br.success(br.attempt())  # a success resets the run of failures
    for _ in range(2):
        br.failure(br.attempt())
    assert br.state is BreakerState.CLOSED and br.allows()
    br.failure(br.attempt())
    assert br.state is BreakerState.OPEN and not br.allows() and br.times_opened == 1
    now[0] += 9.9
    assert not br.allows()
    now[0] += 0.2
    assert br.allows() and br.state is BreakerState.HALF_OPEN
    probe = br.attempt()
    assert probe and not br.allows()  # one probe at a time
    br.success(probe)
    assert br.state is BreakerState.HALF_OPEN and br.allows()
    br.success(br.attempt())
    assert br.state is BreakerState.CLOSED and br.consecutive_failures == 0


def test_a_failed_probe_reopens_and_a_probe_without_verdict_frees_the_slot():
    now = [0.0]
    br = CircuitBreaker(failure_threshold=1, cooldown=1.0, success_threshold=1, clock=lambda: now[0])
    br.failure(br.attempt())
    now[0] = 1.5
    assert br.allows()
    br.release(br.attempt())  # the client left: no verdict, the next request may probe
    assert br.allows() and br.state is BreakerState.HALF_OPEN
    br.failure(br.attempt())
    assert br.state is BreakerState.OPEN and br.times_opened == 2 and not br.allows()


async def test_failing_backend_is_taken_out_and_probed_back_in_when_it_recovers():
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False), 2)
    bad, good = ems
    faults = bad.app[STATE].faults
    faults.config = FaultConfig(error_rate=1.0)
    proxy = await start_proxy(ProxyConfig(
        port=0, backends=[bad.url, good.url], strategy="round_robin", time_scale=TIME_SCALE, health_interval=0.2,
        retries=1, retry_backoff=0.0, breaker_failures=3, breaker_cooldown=0.3, breaker_successes=2,
    ))
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=10)
    backend = proxy.router.registry.get(bad.url)
    try:
        async with aiohttp.ClientSession() as s:
            async def scrape() -> str:
                async with s.get(proxy.url + "/metrics") as r:
                    return await r.text()

            async def admin_state() -> str:
                async with s.get(proxy.url + "/admin/backends") as r:
                    return {b["url"]: b for b in (await r.json())["backends"]}[bad.url]["circuit"]["state"]

            for _ in range(8):  # every request still succeeds: the failures are retried on the good backend
                r = await client.completions.create(model=MODEL, prompt="hello there", max_tokens=3)
                assert r.choices[0].finish_reason == "length"
            assert backend.breaker.state is BreakerState.OPEN and backend.healthy  # /health still passes
            assert faults.counts["error"] == 3
            states = metric_samples(await scrape(), "kvroute_backend_circuit_state")
            assert states[(("backend", bad.url), ("state", "open"))] == 1.0
            assert states[(("backend", good.url), ("state", "closed"))] == 1.0
            assert await admin_state() == "open"
            n_before = backend.processed
            for _ in range(4):  # open: no traffic at all, not even probes, during the cool-down
                await client.completions.create(model=MODEL, prompt="hello there", max_tokens=3)
            if backend.breaker.state is BreakerState.OPEN:
                assert backend.processed == n_before

            faults.config = FaultConfig()  # the backend recovers

            async def closed_again() -> bool:
                await client.completions.create(model=MODEL, prompt="hello again", max_tokens=3)
                return backend.breaker.state is BreakerState.CLOSED

            await wait_for_async(closed_again, timeout=10, what="breaker to close after successful probes")
            assert await admin_state() == "closed"
            opened = metric_samples(await scrape(), "kvroute_backend_circuit_opened_total")
            assert opened[(("backend", bad.url),)] >= 1
            served = backend.processed
            for _ in range(4):
                await client.completions.create(model=MODEL, prompt="back in rotation", max_tokens=3)
            assert backend.processed >= served + 2  # round robin sends it its share again
    finally:
        await client.close()
        await proxy.stop()
        for e in ems:
            await e.stop()
    await wait_for(lambda: backend.in_flight == 0, what="no request left in flight")
