"""Routing through the proxy with the openai SDK over 4 real emulators: affinity, spread, strategies."""
from __future__ import annotations

import random

import aiohttp
import openai
import pytest

from proxy.routing.policies import policy_names

from .conftest import MODEL

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def document(seed: int, words: int = 400) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(words))


async def ask(client, prompt: str, **kw):
    raw = await client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=4, **kw)
    return raw.headers, raw.parse()


async def test_same_prefix_goes_to_the_same_backend_and_hits_its_cache(client):
    doc = document(1)
    h0, r0 = await ask(client, doc + " question 0?")
    assert r0.usage.prompt_tokens_details.cached_tokens == 0
    for q in range(1, 5):
        h, r = await ask(client, doc + f" question {q}?")
        assert h["x-kvroute-backend"] == h0["x-kvroute-backend"]
        assert int(h["x-kvroute-matched-blocks"]) > 0
        # The backend confirms: the proxy's block hashes are the backend's.
        assert r.usage.prompt_tokens_details.cached_tokens == 16 * int(h["x-kvroute-matched-blocks"])
    assert h["x-kvroute-strategy"] == "kv_aware"


async def test_distinct_prefixes_spread_over_all_backends(client, emulators):
    homes = {}
    for d in range(8):
        h, _ = await ask(client, document(100 + d) + " what is it?")
        homes[d] = h["x-kvroute-backend"]
    assert set(homes.values()) == {e.url for e in emulators}
    for d in range(8):
        h, r = await ask(client, document(100 + d) + " and why?")
        assert h["x-kvroute-backend"] == homes[d]
        assert r.usage.prompt_tokens_details.cached_tokens > 0


async def test_chat_routes_on_the_whole_conversation(client):
    system = {"role": "system", "content": document(7, 150)}
    turns = [system, {"role": "user", "content": "first question"}]
    r1 = await client.chat.completions.with_raw_response.create(model=MODEL, messages=turns, max_tokens=4)
    c1 = r1.parse()
    turns += [{"role": "assistant", "content": c1.choices[0].message.content}, {"role": "user", "content": "second"}]
    r2 = await client.chat.completions.with_raw_response.create(model=MODEL, messages=turns, max_tokens=4)
    assert r2.headers["x-kvroute-backend"] == r1.headers["x-kvroute-backend"]
    assert r2.parse().usage.prompt_tokens_details.cached_tokens == 16 * int(r2.headers["x-kvroute-matched-blocks"]) > 0


@pytest.mark.parametrize("name", policy_names())
async def test_every_strategy_by_name_per_request(client, name):
    for i in range(3):
        h, r = await ask(client, document(200 + i, 60), extra_headers={"x-kvroute-strategy": name})
        assert h["x-kvroute-strategy"] == name
        assert r.choices[0].text is not None


async def test_unknown_strategy_header_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        await ask(client, "hello", extra_headers={"x-kvroute-strategy": "nope"})
    assert e.value.body["param"] == "strategy" if isinstance(e.value.body, dict) else True


async def test_strategy_switch_at_run_time(proxy, client):
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/admin/strategy") as r:
            body = await r.json()
            assert body["strategy"] == "kv_aware" and "round_robin" in body["available"]
        async with s.put(proxy.url + "/admin/strategy", json={"strategy": "round_robin"}) as r:
            assert r.status == 200 and (await r.json())["strategy"] == "round_robin"
        backends = [(await ask(client, document(300, 80)))[0]["x-kvroute-backend"] for _ in range(4)]
        assert len(set(backends)) == 4  # same prompt, round robin ignores the cache
        async with s.put(proxy.url + "/admin/strategy", json={"strategy": "bogus"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "strategy"
        async with s.put(proxy.url + "/admin/strategy", data=b"{not json") as r:
            assert r.status == 400
        async with s.put(proxy.url + "/admin/strategy", json={"strategy": "prefix"}) as r:
            assert r.status == 200
    h, _ = await ask(client, document(300, 80))
    assert h["x-kvroute-strategy"] == "prefix"


async def test_streaming_passes_chunks_and_usage(client):
    raw = await client.completions.with_raw_response.create(
        model=MODEL, prompt=document(5, 50), max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-kvroute-backend"].startswith("http://127.0.0.1:")
    assert raw.headers["x-request-id"]
    chunks = [c async for c in raw.parse()]
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 12
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


async def test_request_id_is_echoed_and_forwarded(proxy):
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/completions", json={"model": MODEL, "prompt": "hi there", "max_tokens": 2},
                          headers={"X-Request-ID": "abc-123"}) as r:
            assert r.status == 200
            assert r.headers["x-request-id"] == "abc-123"
            body = await r.json()
        assert body["id"] == "cmpl-abc-123"  # the emulator names the completion after the forwarded X-Request-ID
        async with s.post(proxy.url + "/v1/completions", json={"model": MODEL, "prompt": "hi there", "max_tokens": 2}) as r:
            assert len(r.headers["x-request-id"]) >= 16


async def test_models_health_and_metrics(proxy, client):
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    await ask(client, document(9, 100))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/health") as r:
            assert r.status == 200
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()
    assert 'kvroute_requests_total{backend="http://127.0.0.1' in text
    assert "kvroute_ttft_seconds_bucket" in text and "kvroute_matched_blocks_bucket" in text
    assert "kvroute_backend_healthy" in text and "kvroute_backend_in_flight" in text
