"""LoRA adapters end to end: real emulators (one serving an adapter) publish KV events over ZMQ, a
real proxy learns the adapter from /v1/models and hashes its blocks with vLLM's LoRA key, the real
openai SDK sends the traffic. Adapter requests reach only the backend serving the adapter; what the
proxy matched equals what the backend reports cached, in exact and approximate mode; base-model and
adapter prompts with the same text never share blocks; an unknown adapter is a 404 no backend sees."""
from __future__ import annotations

import aiohttp
import openai
import pytest

from kvblocks import LoraKey, extra_keys

from .helpers import eventually
from .test_exact_routing import BLOCK, Cluster, truth

BASE = "meta-llama/Llama-2-13b-hf"
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def cluster():
    c = Cluster()
    yield c
    await c.close()


def tokens(i: int, n_blocks: int = 3) -> list[int]:
    return [2000 + 300 * i + k for k in range(n_blocks * BLOCK + 5)]


async def send(client, model: str, prompt) -> tuple[str, int, int]:
    raw = await client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=1,
                                                            extra_headers={"x-kvroute-strategy": "prefix"})
    resp = raw.parse()
    assert resp.model == model
    cached = resp.usage.prompt_tokens_details.cached_tokens if resp.usage.prompt_tokens_details else 0
    return raw.headers["x-kvroute-backend"], int(raw.headers["x-kvroute-matched-blocks"]), cached


async def served_requests(em) -> float:
    async with aiohttp.ClientSession() as http, http.get(em.url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success_total"))


@pytest.mark.parametrize("events", [True, False], ids=["exact", "approximate"])
async def test_adapter_blocks_are_their_own_and_match_what_the_backend_caches(cluster, events):
    with_sql = await cluster.emulator(lora_modules=["sql=/adapters/sql-v1"], num_gpu_blocks=33, max_model_len=512)
    await cluster.emulator(num_gpu_blocks=33, max_model_len=512)
    proxy = await cluster.proxy(events=events)
    router = proxy.router
    await eventually(lambda: router.registry.get(with_sql.url).adapters, what="adapters learned from /v1/models")
    assert router.extra_keys("sql") == extra_keys(LoraKey("sql", "/adapters/sql-v1"))
    client = cluster.client(proxy)
    models = {m.id: m for m in (await client.models.list()).data}
    assert models["sql"].parent == BASE and models["sql"].root == "/adapters/sql-v1"

    p = tokens(1)
    lora_hashes = router.hashes(p, model="sql")
    assert not set(lora_hashes) & set(router.hashes(p, model=BASE))
    url, matched, cached = await send(client, "sql", p)
    assert (url, matched, cached) == (with_sql.url, 0, 0)
    if events:
        await eventually(lambda: set(lora_hashes) <= router.kv_events.blocks(url), what="the adapter's BlockStored")
        assert router.kv_events.blocks(url) == truth(with_sql)
    for _ in range(3):
        url, matched, cached = await send(client, "sql", p)
        assert url == with_sql.url and matched * BLOCK == cached == 3 * BLOCK
    # The same text on the base model shares nothing with the adapter's blocks, on either side.
    _, matched, cached = await send(client, BASE, p)
    assert (matched, cached) == (0, 0)


async def test_adapter_requests_reach_only_backends_serving_it_and_an_unknown_one_is_a_404(cluster):
    with_sql = await cluster.emulator(lora_modules=["sql=/adapters/sql"], num_gpu_blocks=33, max_model_len=512)
    without = await cluster.emulator(num_gpu_blocks=33, max_model_len=512)
    proxy = await cluster.proxy(events=False)
    await eventually(lambda: proxy.router.registry.get(with_sql.url).adapters, what="adapters learned")
    client = cluster.client(proxy)
    for i in range(6):  # distinct prompts: round robin would send half of them to `without`
        url, _, _ = await send(client, "sql", tokens(10 + i, 1))
        assert url == with_sql.url
    before = [await served_requests(e) for e in cluster.emulators]
    with pytest.raises(openai.NotFoundError) as err:
        await client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=1)
    assert "no-such-adapter" in err.value.message
    assert [await served_requests(e) for e in cluster.emulators] == before  # no backend was asked
    assert await served_requests(without) == 0


async def test_an_adapter_loaded_at_run_time_is_learned_and_routed(cluster):
    em = await cluster.emulator(enable_lora=True, num_gpu_blocks=33, max_model_len=512)
    proxy = await cluster.proxy(events=False)
    client = cluster.client(proxy)
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="late", prompt="hi", max_tokens=1)
    async with aiohttp.ClientSession() as http:
        async with http.post(em.url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "/a/late"}) as r:
            assert r.status == 200
    await eventually(lambda: "late" in (proxy.router.registry.get(em.url).adapters or {}), what="the new adapter")
    url, _, _ = await send(client, "late", tokens(3))
    assert url == em.url


async def test_runtime_loading_sends_adapter_traffic_to_backends_that_can_load_it(cluster):
    """--lora-runtime-load: round robin offers every backend of the base model; one that allows runtime
    loading gets the adapter loaded first, one that refuses is marked and the request retried, none fails."""
    has = await cluster.emulator(lora_modules=["sql=/adapters/sql"], num_gpu_blocks=33, max_model_len=512)
    can = await cluster.emulator(enable_lora=True, num_gpu_blocks=33, max_model_len=512)
    cannot = await cluster.emulator(num_gpu_blocks=33, max_model_len=512)
    from proxy.config import ProxyConfig
    from proxy.app import start_proxy

    from .test_exact_routing import TIME_SCALE

    proxy = await start_proxy(ProxyConfig(port=0, backends=[e.url for e in cluster.emulators], time_scale=TIME_SCALE,
                                          health_interval=0.1, metrics_interval=0.1, lora_runtime_load=True,
                                          strategy="round_robin", retries=2))
    cluster.proxies.append(proxy)
    reg = proxy.router.registry
    await eventually(lambda: reg.get(has.url).adapters, what="adapters learned")
    client = cluster.client(proxy)
    seen = [(await send_rr(client, "sql", tokens(40 + i, 1))) for i in range(6)]
    assert set(seen) == {has.url, can.url}
    assert reg.get(can.url).adapters["sql"].path == "/adapters/sql" and reg.get(cannot.url).runtime_lora is False
    async with aiohttp.ClientSession() as http, http.get(can.url + "/v1/models") as r:
        assert "sql" in {m["id"] for m in (await r.json())["data"]}  # loaded there for real
    assert await served_requests(cannot) == 0


async def send_rr(client, model: str, prompt) -> str:
    raw = await client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=1)
    assert raw.parse().model == model
    return raw.headers["x-kvroute-backend"]


async def test_kv_aware_charges_a_load_so_an_idle_backend_with_the_adapter_wins(cluster):
    has = await cluster.emulator(lora_modules=["sql=/adapters/sql"], num_gpu_blocks=33, max_model_len=512)
    can = await cluster.emulator(enable_lora=True, num_gpu_blocks=33, max_model_len=512)
    from proxy.config import ProxyConfig
    from proxy.app import start_proxy

    from .test_exact_routing import TIME_SCALE

    proxy = await start_proxy(ProxyConfig(port=0, backends=[has.url, can.url], time_scale=TIME_SCALE, health_interval=0.1,
                                          metrics_interval=0.1, lora_runtime_load=True))
    cluster.proxies.append(proxy)
    await eventually(lambda: proxy.router.registry.get(has.url).adapters, what="adapters learned")
    client = cluster.client(proxy)
    for i in range(4):  # one at a time: `has` is idle each time, a load would cost more than nothing
        assert await send_rr(client, "sql", tokens(60 + i, 1)) == has.url
    assert "sql" not in proxy.router.registry.get(can.url).adapters
