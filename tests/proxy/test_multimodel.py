"""Several base models behind one proxy (real emulators, real proxy, the openai SDK): /v1/models is
the union; a request only ever reaches backends serving its model, and load-aware choices are made
among those alone; the proxy's metrics carry the model; an unknown model is a 404 no backend sees."""
from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from emulator.config import EmulatorConfig
from emulator.server import start_emulator
from proxy.config import ProxyConfig
from proxy.app import start_proxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def stack():
    def cfg(model: str) -> EmulatorConfig:
        return EmulatorConfig(port=0, model=model, num_gpu_blocks=200, max_model_len=2048, time_scale=0.02,
                              log_requests=False)

    ems = [await start_emulator(cfg(m)) for m in ("model-a", "model-a", "model-b")]
    proxy = await start_proxy(ProxyConfig(port=0, backends=[e.url for e in ems], time_scale=0.02, health_interval=0.2,
                                          metrics_interval=0.2))
    client = AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    yield ems, proxy, client
    await client.close()
    await proxy.stop()
    for e in ems:
        await e.stop()


async def backend_of(client, model: str, i: int, max_tokens: int = 2) -> str:
    raw = await client.completions.with_raw_response.create(
        model=model, prompt=f"prompt {i}: " + " ".join(f"t{i}x{k}" for k in range(50)), max_tokens=max_tokens)
    assert raw.parse().model == model
    return raw.headers["x-kvroute-backend"]


async def test_each_model_is_routed_among_its_own_backends(stack):
    ems, proxy, client = stack
    a_urls, b_url = {ems[0].url, ems[1].url}, ems[2].url
    assert {m.id for m in (await client.models.list()).data} == {"model-a", "model-b"}
    # A burst on model-b: its one backend is loaded, the idle model-a backends must not be used.
    b_seen = await asyncio.gather(*(backend_of(client, "model-b", i, max_tokens=64) for i in range(12)))
    assert set(b_seen) == {b_url}
    # model-a's burst is spread over model-a's two backends (load-aware within the model), never on b.
    a_seen = await asyncio.gather(*(backend_of(client, "model-a", 100 + i, max_tokens=64) for i in range(12)))
    assert set(a_seen) == a_urls
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as r:
        text = await r.text()
    assert f'kvroute_requests_total{{backend="{b_url}",model="model-b",status="200",strategy="kv_aware"}} 12.0' in text
    assert 'kvroute_ttft_seconds_count{model="model-a",strategy="kv_aware"} 12.0' in text
    with pytest.raises(openai.NotFoundError) as err:
        await client.completions.create(model="model-c", prompt="hi", max_tokens=1)
    assert "model-c" in err.value.message
