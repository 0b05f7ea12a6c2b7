"""LoRA adapters, session keys and the exact-view audit on real vLLM (issue #23).

Server b serves two tiny adapters (`sql`, `chat`, --max-loras 1), server a none. Through the proxy,
for adapter traffic, the blocks the proxy matched equal vLLM's cached_tokens, in exact and
approximate mode; the same text on the base model and on each adapter shares no block (vLLM agrees:
it reports nothing cached); an adapter request never reaches a; an unknown adapter is a 404 that
no server sees; a session key keeps a session on one server until it is overloaded. Last, a third
server started the way a new user might (its KV-event endpoint `tcp://127.0.0.1:P`, so vLLM
connects instead of binding): the proxy first claims `exact`, then its answers give it away.
"""
from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp
import openai
import pytest

from kvblocks import LoraKey, extra_keys
from proxy.config import ProxyConfig
from proxy.index.exact_audit import MISSES, NO_EVENTS
from proxy.app import start_proxy

from ..kv_events.helpers import eventually
from .conftest import VLLMPair, _unavailable
from .helpers import client, metric, proxy_for
from .test_proxy_real_vllm import doc
from .vllm_server import BLOCK_SIZE, MODEL_NAME, VLLMServer, VLLMUnavailable, free_port

pytestmark = pytest.mark.timeout(1800)


async def complete(c, model: str, prompt: str, headers=None, max_tokens: int = 2) -> tuple[int, int, str]:
    """(matched blocks, cached blocks vLLM reported, backend) for one completion on `model`."""
    raw = await c.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                       temperature=0, extra_headers=headers)
    out = raw.parse()
    assert out.model == model
    cached = out.usage.prompt_tokens_details.cached_tokens or 0
    # (a strategy that does not read the prompt, round robin, claims no matched blocks: -1)
    return int(raw.headers.get("x-kvroute-matched-blocks", -1)), cached // BLOCK_SIZE, raw.headers["x-kvroute-backend"]


def direct_cached(url: str, model: str, prompt: str) -> int:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 1}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return (json.loads(r.read())["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


async def learned(p, pair: VLLMPair) -> None:
    b = p.router.registry.get(pair.b.url)
    await eventually(lambda: set(b.adapters) == {"sql", "chat"}, timeout=30, what="b's adapters from /v1/models")


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approximate"])
async def test_adapter_blocks_match_cached_tokens_and_never_meet_base_blocks(vllm: VLLMPair, tmp_path, exact):
    async with proxy_for(vllm, tmp_path, exact=exact) as p:
        await learned(p, vllm)
        sql = p.router.extra_keys("sql")
        assert sql == extra_keys(LoraKey("sql", str(vllm.adapters["sql"])))  # vLLM's root: the path it loaded
        c = client(p)
        text = doc(2300 if exact else 2400, 300)
        first = await complete(c, "sql", text)
        assert first[:2] == (0, 0) and first[2] == vllm.b.url
        if exact:
            hashes = p.router.hashes(p.router.tokenize(text), model="sql")
            await eventually(lambda: set(hashes) <= p.router.kv_events.blocks(vllm.b.url), timeout=30,
                             what="the adapter's BlockStored, in the proxy's hashes")
        for _ in range(2):
            matched, cached, url = await complete(c, "sql", text)
            assert url == vllm.b.url and matched == cached > 5, (matched, cached)
        # The other adapter and the base model: the same text, no shared block, on either side.
        matched, cached, url = await complete(c, "chat", text)
        assert (matched, cached, url) == (0, 0, vllm.b.url)
        assert direct_cached(vllm.b.url, MODEL_NAME, text) == 0  # vLLM: base blocks are not the adapters'
        if exact:
            assert p.router.kv_events.mode(vllm.b.url) == "exact"  # the audit found nothing to object to


async def test_adapter_requests_reach_only_the_server_with_it_and_an_unknown_one_is_a_404(vllm: VLLMPair, tmp_path):
    async with proxy_for(vllm, tmp_path, exact=False, strategy="round_robin") as p:
        await learned(p, vllm)
        c = client(p)
        seen = {(await complete(c, "sql" if i % 2 else "chat", doc(2500 + i, 40)))[2] for i in range(6)}
        assert seen == {vllm.b.url}  # round robin alternates base traffic; adapter traffic has one home
        # vLLM's vllm:lora_requests_info gives b's adapter slots (kv_aware's slot term reads them), and
        # the adapters our requests held there are counted back to zero now that they have ended.
        b = p.router.registry.get(vllm.b.url)
        await eventually(lambda: b.scraped.max_loras == 1, timeout=30, what="b's --max-loras from its /metrics")
        assert b.loras == {} and b.in_flight == 0
        before = [await metric(s.url, "vllm:request_success_total") for s in vllm.servers]
        with pytest.raises(openai.NotFoundError) as err:
            await c.completions.create(model="no-such-adapter", prompt="hello", max_tokens=1)
        assert "no-such-adapter" in err.value.message
        assert [await metric(s.url, "vllm:request_success_total") for s in vllm.servers] == before


async def test_a_session_key_keeps_a_session_on_one_server_until_it_is_overloaded(vllm: VLLMPair, tmp_path):
    async with proxy_for(vllm, tmp_path, exact=True, policy_param=["kv_aware.session_valve_s=0.2"]) as p:
        c = client(p)
        key = {"x-session-id": "real-session-1"}
        homes = {(await complete(c, MODEL_NAME, doc(2600 + i, 60), key))[2] for i in range(5)}
        assert len(homes) == 1  # five unrelated prompts, one server
        home = homes.pop()
        # Without the key kv_aware spreads the same kind of traffic over both servers.
        assert len({(await complete(c, MODEL_NAME, doc(2700 + i, 60)))[2] for i in range(6)}) == 2
        burst = await asyncio.gather(*(complete(c, MODEL_NAME, doc(2800 + i, 60), key, max_tokens=48) for i in range(16)))
        where = [x[2] for x in burst]
        assert where.count(home) >= 2 and len(set(where)) == 2, where  # overloaded: the rest went elsewhere


@pytest.fixture(scope="module")
def miswired(vllm_pair: VLLMPair):
    """A third server whose KV-event endpoint is `tcp://127.0.0.1:P`: vLLM connects there, as does the proxy."""
    s = VLLMServer("miswired", vllm_pair.a.python, vllm_pair.a.model, cpu=0, events_connect=True)
    try:
        s.start(vllm_pair.log_dir)
        s.wait_ready()
    except VLLMUnavailable as e:
        s.stop()
        _unavailable(str(e))
    yield s
    s.stop()


async def test_a_miswired_event_endpoint_on_real_vllm_leaves_exact_mode_and_says_why(miswired: VLLMServer, tmp_path):
    cfg = ProxyConfig(port=0, backends=[miswired.url], kv_events=[miswired.kv_events_flag], tokenizer=str(miswired.model),
                      health_interval=2.0, metrics_interval=0.5)
    p = await start_proxy(cfg)
    try:
        r = p.router
        await eventually(lambda: r.hasher.block_size == BLOCK_SIZE and r.kv_events.is_exact(miswired.url), timeout=60,
                         what="'exact' from the replay socket's empty answer")
        c = client(p)
        text = doc(3000, 400)
        blocks = (len(r.tokenize(text)) - 1) // BLOCK_SIZE  # what vLLM reports cached on a repeat
        assert blocks >= 10
        seen = [await complete(c, MODEL_NAME, text) for _ in range(6)]
        assert seen[1][:2] == (0, blocks)  # vLLM hit, the "exact" view saw nothing
        await eventually(lambda: r.kv_events.mode(miswired.url) == "approximate", timeout=30, what="leaving exact")
        assert r.kv_events.subscribers[miswired.url].stats.batches_applied == 0  # no event ever arrived
        async with aiohttp.ClientSession() as http, http.get(p.url + "/admin/backends") as resp:
            audit = (await resp.json())["backends"][0]["exact_audit"]
        assert audit["untrusted"] in (MISSES, NO_EVENTS) and audit["why"]
        assert await metric(p.url, "kvroute_exact_view_untrusted", {"reason": audit["untrusted"]}) == 1.0
        matched, cached, _ = await complete(c, MODEL_NAME, text)
        assert matched == cached == blocks  # routed on the approximate index, which knows the prompt is there
    finally:
        await p.stop()
