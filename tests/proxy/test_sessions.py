"""Session keys end to end: real emulators, a real proxy, the openai SDK. Requests naming a session
(x-session-id, or the `user` field when enabled) stay on one backend while it is not overloaded,
whatever their prompts; a new session starts on the rendezvous winner of its key (what another
replica would pick); an overloaded home is left; the header name is configurable."""
from __future__ import annotations

import asyncio

import pytest
from openai import AsyncOpenAI

from emulator.config import EmulatorConfig
from emulator.server import start_emulator
from proxy.config import ProxyConfig
from proxy.routing.session import SessionAffinity, session_key
from proxy.app import start_proxy

pytestmark = pytest.mark.timeout(60)
MODEL = "meta-llama/Llama-2-13b-hf"


@pytest.fixture
async def stack(request):
    opts = getattr(request, "param", {})
    ems = [await start_emulator(EmulatorConfig(port=0, time_scale=0.02, log_requests=False)) for _ in range(3)]
    proxy = await start_proxy(ProxyConfig(port=0, backends=[e.url for e in ems], time_scale=0.02, health_interval=0.2,
                                          metrics_interval=0.2, **opts))
    client = AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    yield proxy, client
    await client.close()
    await proxy.stop()
    for e in ems:
        await e.stop()


async def backend_of(client, prompt: str, headers=None, max_tokens: int = 2, **extra) -> str:
    raw = await client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                            extra_headers=headers, **extra)
    return raw.headers["x-kvroute-backend"]


def distinct(i: int) -> str:
    return f"request {i}: " + " ".join(f"w{i}x{k}" for k in range(60))


async def test_a_session_stays_on_its_rendezvous_home_and_sessions_spread(stack):
    proxy, client = stack
    homes = {}
    for s in range(6):
        key = f"session-{s}"
        seen = {await backend_of(client, distinct(100 * s + i), {"x-session-id": key}) for i in range(4)}
        assert len(seen) == 1, (key, seen)  # distinct prompts, one backend
        homes[key] = seen.pop()
        # a fresh replica (no shared state) would start this session on the same backend
        assert homes[key] == SessionAffinity().home(key, proxy.router.registry.healthy()).url
    assert len(set(homes.values())) >= 2  # keys spread over backends
    # without a key the same prompts are spread by the policy as before
    assert len({await backend_of(client, distinct(900 + i)) for i in range(6)}) >= 2


async def test_an_overloaded_home_is_left(stack):
    proxy, client = stack
    key = {"x-session-id": "busy"}
    home = await backend_of(client, distinct(1), key)
    # many long requests of the session at once: its home's queue outgrows the valve
    seen = await asyncio.gather(*(backend_of(client, distinct(10 + i), key, max_tokens=200) for i in range(24)))
    assert seen.count(home) >= 3 and len(set(seen)) >= 2, seen


@pytest.mark.parametrize("stack", [{"session_header": "x-conversation", "session_user_field": True}], indirect=True)
async def test_the_header_name_is_configurable_and_the_user_field_is_an_option(stack):
    proxy, client = stack
    by_header = {await backend_of(client, distinct(i), {"x-conversation": "c1"}) for i in range(4)}
    by_user = {await backend_of(client, distinct(50 + i), user="alice") for i in range(4)}
    assert len(by_header) == 1 and len(by_user) == 1
    assert by_header.pop() == SessionAffinity().home("c1", proxy.router.registry.healthy()).url


def test_session_key_sources():
    assert session_key({"x-session-id": "a"}, "x-session-id") == "a"
    assert session_key({}, "x-session-id", user="u") is None
    assert session_key({}, "x-session-id", user="u", use_user=True) == "u"
    assert session_key({"x-session-id": "h"}, "x-session-id", user="u", use_user=True) == "h"
    assert session_key({"x-session-id": "k" * 1000}, "x-session-id") == "k" * 256
    assert session_key({"x-session-id": "a"}, "") is None
