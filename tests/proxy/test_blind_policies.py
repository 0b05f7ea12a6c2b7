"""Policies that never read the prompt (round_robin, random, least_loaded) route it untokenized.

Through a real proxy over 4 emulators: the prompt is not tokenized or looked up (the chunk cache
and the prefix index are untouched), no matched-block count is claimed, and what still needs the
token count (vLLM's context-length rule) tokenizes on demand with the same answer as before.
"""
from __future__ import annotations

import aiohttp
import pytest

from .conftest import MODEL
from .test_proxy_routing import document

BLIND = ("round_robin", "random", "least_loaded")


def routing_state(proxy) -> tuple[int, int, dict[str, int]]:
    r = proxy.router
    return r.chunked.hits, r.chunked.misses, {b.url: r.index.num_blocks(b.url) for b in r.registry}


async def complete(s: aiohttp.ClientSession, proxy, prompt: str, strategy: str, max_tokens: int = 4):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
    async with s.post(proxy.url + "/v1/completions", json=body, headers={"x-kvroute-strategy": strategy}) as r:
        return r.status, r.headers, await r.json()


@pytest.mark.parametrize("strategy", BLIND)
async def test_a_blind_policy_tokenizes_nothing_and_claims_no_match(proxy, strategy):
    assert not proxy.router.policies[strategy].reads_prompt
    async with aiohttp.ClientSession() as s:
        for i in range(3):  # warm: kv_aware tokenizes and records the document
            status, h, _ = await complete(s, proxy, document(40) + f" question {i}?", "kv_aware")
            assert status == 200 and int(h["x-kvroute-matched-blocks"]) >= 0
        before = routing_state(proxy)
        for i in range(8):
            status, h, body = await complete(s, proxy, document(40) + f" other question {i}?", strategy)
            assert status == 200 and body["choices"][0]["text"]
            assert h["x-kvroute-strategy"] == strategy and h["x-kvroute-backend"].startswith("http://127.0.0.1:")
            assert "x-kvroute-matched-blocks" not in h
        assert routing_state(proxy) == before
    assert all(b.in_flight == 0 for b in proxy.router.registry)
    text = (await proxy_metrics(proxy))
    assert f'kvroute_matched_blocks_count{{strategy="{strategy}"}}' not in text
    assert f'kvroute_requests_total{{backend=' in text


async def proxy_metrics(proxy) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/metrics") as r:
            return await r.text()


async def test_a_blind_policy_still_applies_the_context_length_rule(proxy):
    """The length check tokenizes a blind prompt when its estimate is near the limit: same 400 as kv_aware."""
    limit = proxy.router.max_model_len(MODEL)
    too_long = document(41, limit)  # about 2.5 tokens a word: over the limit, under 4 bytes a token of it
    answers = {}
    async with aiohttp.ClientSession() as s:
        for strategy in ("kv_aware", "round_robin"):
            before = routing_state(proxy)[:2]
            answers[strategy] = await complete(s, proxy, too_long, strategy)
            assert routing_state(proxy)[:2] != before, strategy  # the proxy tokenized it to check the length
        status, h, _ = await complete(s, proxy, document(42, 60), "round_robin", max_tokens=8)
        assert status == 200 and "x-kvroute-matched-blocks" not in h
    (s1, _, b1), (s2, _, b2) = answers["kv_aware"], answers["round_robin"]
    assert s1 == s2 == 400 and b1 == b2 and f"maximum context length is {limit}" in b1["error"]["message"]
