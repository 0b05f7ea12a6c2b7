"""Emulator fault injection: decisions (seeded, without HTTP), then each fault on a real server."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from emulator.__main__ import CRASH_EXIT_CODE
from emulator.config import EmulatorConfig
from emulator.faults import FaultConfig, FaultInjector
from emulator.server import STATE, start_emulator

from .helpers import MODEL, TIME_SCALE, ServerProcess, engines_idle, wait_for

PROMPT = "Tell me a long story about the sea and the ships that sail on it, " * 3


def test_faults_are_off_by_default_and_validated():
    cfg = EmulatorConfig()
    assert not FaultConfig.from_emulator(cfg).enabled
    inj = FaultInjector(FaultConfig.from_emulator(cfg))
    assert all(inj.plan().clean for _ in range(100)) and inj.health_ok()
    with pytest.raises(ValueError, match="fault_error_rate"):
        EmulatorConfig(fault_error_rate=1.5)
    with pytest.raises(ValueError, match="5xx"):
        EmulatorConfig(fault_error_status=404)


def test_plans_are_reproducible_and_follow_the_rates():
    cfg = FaultConfig(error_rate=0.2, hang_rate=0.1, latency_spike_rate=0.3, latency_spike=0.5, cut_after=3, cut_rate=0.5)
    one, two = FaultInjector(cfg, seed=7), FaultInjector(cfg, seed=7)
    plans = [one.plan() for _ in range(2000)]
    assert plans == [two.plan() for _ in range(2000)]
    assert plans != [FaultInjector(cfg, seed=8).plan() for _ in range(2000)]
    errors = sum(p.error_status == 503 for p in plans) / 2000
    hangs = sum(p.hang for p in plans) / 2000
    cuts = sum(p.cut_after == 3 for p in plans) / 2000
    assert 0.16 < errors < 0.24
    assert 0.8 * 0.1 * 0.07 < hangs < 0.8 * 0.1 * 1.3  # hang is drawn only for requests not failed
    assert 0.72 * 0.5 * 0.85 < cuts < 0.72 * 0.5 * 1.15
    assert all(p.delay in (0.0, 0.5) for p in plans) and any(p.delay for p in plans)


def test_crash_after_and_slow_start_follow_count_and_clock():
    now = [100.0]
    inj = FaultInjector(FaultConfig(crash_after=3, slow_start=5.0), clock=lambda: now[0])
    assert [inj.plan().crash for _ in range(5)] == [False, False, False, True, True]
    assert not inj.health_ok()
    now[0] += 4.9
    assert not inj.health_ok()
    now[0] += 0.2
    assert inj.health_ok()


def test_cli_and_env_set_fault_flags():
    cfg = EmulatorConfig.from_cli(
        ["--fault-error-rate", "0.25", "--fault-cut-after", "4", "--fault-latency-spike", "0.2"],
        env={"KVROUTE_EMU_FAULT_HANG_RATE": "0.1", "KVROUTE_EMU_FAULT_CRASH_AFTER": "9",
             "KVROUTE_EMU_FAULT_ERROR_RATE": "0.9"},
    )
    f = FaultConfig.from_emulator(cfg)
    assert (f.error_rate, f.cut_after, f.latency_spike, f.hang_rate, f.crash_after) == (0.25, 4, 0.2, 0.1, 9)


async def _start(**faults):
    return await start_emulator(EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False, **faults))


def _body(stream: bool, max_tokens: int = 12) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": stream}


async def test_error_rate_answers_5xx_json_before_any_work():
    em = await _start(fault_error_rate=1.0)
    try:
        async with aiohttp.ClientSession() as s:
            for stream in (False, True):
                async with s.post(em.url + "/v1/completions", json=_body(stream)) as r:
                    assert r.status == 503
                    body = await r.json()
                    assert body["error"]["code"] == 503 and "injected" in body["error"]["message"]
            # Bad input is still a 400, not a fault.
            async with s.post(em.url + "/v1/completions", json={"prompt": 3}) as r:
                assert r.status == 400
        assert em.engine.num_steps == 0 and engines_idle([em])
    finally:
        await em.stop()


async def test_hang_holds_until_the_client_gives_up_and_frees_nothing_it_never_took():
    em = await _start(fault_hang_rate=1.0)
    try:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(asyncio.TimeoutError):
                async with s.post(em.url + "/v1/completions", json=_body(True),
                                  timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                    await r.read()
        assert em.app[STATE].faults.counts["hang"] == 1
        await wait_for(lambda: em.app[STATE].faults.hanging == 0, what="hung handler to end when the client left")
        await wait_for(lambda: engines_idle([em]), what="engine idle")
    finally:
        t0 = time.monotonic()
        await em.stop()
        assert time.monotonic() - t0 < 1.5  # a hung handler does not hold up shutdown


async def test_latency_spike_delays_the_first_byte():
    em = await _start(fault_latency_spike_rate=1.0, fault_latency_spike=0.3)
    try:
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            async with s.post(em.url + "/v1/completions", json=_body(True, 2)) as r:
                await r.content.readany()
                first = time.monotonic() - t0
                await r.read()
        assert first >= 0.3
    finally:
        await em.stop()


async def test_stream_cut_drops_the_connection_without_done_and_frees_blocks():
    em = await _start(fault_cut_after=3)
    try:
        async with aiohttp.ClientSession() as s:
            got = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.post(em.url + "/v1/completions", json=_body(True, 40)) as r:
                    assert r.status == 200
                    async for chunk in r.content.iter_any():
                        got += chunk
            assert got.count(b"data: {") == 3 and b"[DONE]" not in got
            with pytest.raises(aiohttp.ServerDisconnectedError):
                async with s.post(em.url + "/v1/completions", json=_body(False, 40)) as r:
                    await r.read()
            # An answer shorter than the cut completes normally.
            async with s.post(em.url + "/v1/completions", json=_body(True, 2)) as r:
                text = await r.read()
            assert text.endswith(b"data: [DONE]\n\n")
        await wait_for(lambda: engines_idle([em]), what="blocks freed after cuts")
        assert em.engine.block_pool.num_cached_blocks() > 0  # prompts were really run
    finally:
        await em.stop()


async def test_slow_start_fails_health_then_recovers():
    em = await _start(fault_slow_start=0.3)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(em.url + "/health") as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == 503

            async def healthy() -> bool:
                async with s.get(em.url + "/health") as r:
                    return r.status == 200

            deadline = time.monotonic() + 5
            while not await healthy():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
    finally:
        await em.stop()


async def test_crash_in_process_drops_connections_and_stops_listening():
    em = await _start(fault_crash_after=1)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(em.url + "/v1/completions", json=_body(False, 2)) as r:
                assert r.status == 200
            with pytest.raises(aiohttp.ClientConnectionError):
                async with s.post(em.url + "/v1/completions", json=_body(False, 2)) as r:
                    await r.read()
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientConnectionError):
                async with s.get(em.url + "/health") as r:
                    await r.read()
        assert engines_idle([em])
    finally:
        await em.stop()


async def test_crash_in_a_subprocess_exits_the_process():
    emu = await asyncio.to_thread(
        ServerProcess, "emulator", ["--port", "0", "--time-scale", "0.01", "--no-log-requests", "--fault-crash-after", "2"],
        "EMULATOR_URL",
    )
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(emu.url + "/v1/completions", json=_body(False, 2)) as r:
                    assert r.status == 200
            with pytest.raises(aiohttp.ClientConnectionError):
                async with s.post(emu.url + "/v1/completions", json=_body(False, 2)) as r:
                    await r.read()
        code = await asyncio.to_thread(emu.proc.wait, 10)
        assert code == CRASH_EXIT_CODE
    finally:
        emu.stop()
