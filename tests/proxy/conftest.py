"""Real emulators and a real proxy on loopback (port 0), driven by the real openai SDK."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from openai import AsyncOpenAI

from emulator.config import EmulatorConfig
from emulator.server import start_emulators
from proxy.config import ProxyConfig
from proxy.app import start_proxy

MODEL = "meta-llama/Llama-2-13b-hf"
TIME_SCALE = 0.01


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `cond` until true or fail after `timeout` seconds (no sleeps as synchronisation)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def emulators():
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False), 4)
    yield ems
    for e in ems:
        await e.stop()


@pytest.fixture
async def make_proxy(emulators):
    """Factory: a proxy over the 4 emulators with config overrides; all stopped at teardown."""
    started = []

    async def make(**overrides):
        cfg = dict(port=0, backends=[e.url for e in emulators], time_scale=TIME_SCALE, health_interval=0.2,
                   metrics_interval=0.2)
        cfg.update(overrides)
        p = await start_proxy(ProxyConfig(**cfg))
        started.append(p)
        return p

    yield make
    for p in started:
        await p.stop()


@pytest.fixture
async def proxy(make_proxy):
    return await make_proxy()


@pytest.fixture
async def client(proxy):
    c = AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    yield c
    await c.close()
