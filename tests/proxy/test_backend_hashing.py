"""The proxy hashes blocks as its backends do: their block size and hash algorithm, their tokenizer."""
from __future__ import annotations

import pytest
from openai import AsyncOpenAI

from emulator.config import EmulatorConfig
from emulator.server import start_emulators
from proxy.config import ProxyConfig
from proxy.routing.router import Router
from proxy.app import start_proxy

from .conftest import MODEL, TIME_SCALE, wait_for

DOC = "The quarterly report covers revenue, costs and the outlook for every region. " * 30


@pytest.fixture
async def odd_emulators():
    """Backends that cache 32-token blocks hashed with sha256_cbor (not the proxy's defaults)."""
    cfg = EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False, block_size=32,
                         prefix_caching_hash_algo="sha256_cbor")
    ems = await start_emulators(cfg, 2)
    yield ems
    for e in ems:
        await e.stop()


async def test_proxy_adopts_the_backends_block_size_and_hash_algo(odd_emulators):
    p = await start_proxy(ProxyConfig(port=0, backends=[e.url for e in odd_emulators], time_scale=TIME_SCALE,
                                      health_interval=0.2, metrics_interval=0.1))
    try:
        assert (p.router.hasher.block_size, p.router.hasher.algo) in {(16, "sha256"), (32, "sha256_cbor")}
        await wait_for(lambda: p.router.hasher.block_size == 32, what="the proxy to follow the backends' hashing")
        assert p.router.hasher.algo == "sha256_cbor"
        async with AsyncOpenAI(base_url=p.url + "/v1", api_key="x", max_retries=0) as c:
            await c.completions.create(model=MODEL, prompt=DOC + "First question?", max_tokens=2)
            r = await c.completions.with_raw_response.create(model=MODEL, prompt=DOC + "Second question?", max_tokens=2)
        matched = int(r.headers["x-kvroute-matched-blocks"])
        assert matched > 0
        assert r.parse().usage.prompt_tokens_details.cached_tokens == 32 * matched
    finally:
        await p.stop()


def test_backends_that_disagree_leave_the_hashing_alone():
    router = Router(ProxyConfig(port=0).routing())
    a, _ = router.add_backend("http://a:1")
    b, _ = router.add_backend("http://b:1")
    a.scraped.block_size, a.scraped.hash_algo = 32, "sha256"
    assert router.follow_block_hashing()  # one reporter: adopt
    assert router.hasher.block_size == 32
    b.scraped.block_size, b.scraped.hash_algo = 16, "sha256"
    assert not router.follow_block_hashing()  # a split: no single hashing matches both
    assert router.hasher.block_size == 32
    a.scraped.block_size = 16
    assert router.follow_block_hashing() and router.hasher.block_size == 16


@pytest.fixture
async def two_models():
    """model-16 cached in 16-token sha256 blocks, model-32 in 32-token sha256_cbor blocks (its own server)."""
    cfgs = [EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False, model="model-16", num_gpu_blocks=400),
            EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False, model="model-32", num_gpu_blocks=200,
                           block_size=32, prefix_caching_hash_algo="sha256_cbor")]
    ems = [(await start_emulators(c, 1))[0] for c in cfgs]
    yield ems
    for e in ems:
        await e.stop()


async def test_each_model_is_hashed_as_its_own_backends_hash(two_models):
    """Two models with different block sizes and hash algorithms behind one proxy: each request is hashed
    with its model's backends' hashing, so matched blocks x that block size = cached_tokens for both."""
    p = await start_proxy(ProxyConfig(port=0, backends=[e.url for e in two_models], time_scale=TIME_SCALE,
                                      health_interval=0.2, metrics_interval=0.1))
    try:
        r = p.router
        await wait_for(lambda: r.hasher_for("model-32").block_size == 32 and r.hasher_for("model-16").block_size == 16,
                       what="the proxy to learn each model's hashing")
        assert r.hasher_for("model-32").algo == "sha256_cbor" and r.hasher_for("model-16").algo == "sha256"
        async with AsyncOpenAI(base_url=p.url + "/v1", api_key="x", max_retries=0) as c:
            for model, bs in (("model-16", 16), ("model-32", 32)):
                await c.completions.create(model=model, prompt=DOC + "First question?", max_tokens=2)
                raw = await c.completions.with_raw_response.create(model=model, prompt=DOC + "Second question?",
                                                                   max_tokens=2)
                matched = int(raw.headers["x-kvroute-matched-blocks"])
                cached = raw.parse().usage.prompt_tokens_details.cached_tokens
                assert matched > 0 and cached == bs * matched, (model, matched, cached)
    finally:
        await p.stop()


def test_a_model_gets_its_own_hasher_only_when_its_backends_agree():
    router = Router(ProxyConfig(port=0).routing())
    a, _ = router.add_backend("http://a:1")
    b, _ = router.add_backend("http://b:1")
    c, _ = router.add_backend("http://c:1")
    a.models, b.models, c.models = ["m-16"], ["m-32", "lora-x"], ["m-32"]
    for x, bs in ((a, 16), (b, 32), (c, 32)):
        x.scraped.block_size, x.scraped.hash_algo = bs, "sha256"
    router.index.stored(a.url, [1, 2, 3])
    router.index.stored(b.url, [4, 5])
    assert router.follow_block_hashing()
    assert router.hasher.block_size == 16  # the fleet's: no agreement, the configured one stays
    assert router.hasher_for("m-32").block_size == 32 and router.hasher_for("lora-x").block_size == 32
    assert router.hasher_for("m-16") is router.hasher and router.hasher_for(None) is router.hasher
    assert router.index.num_blocks(b.url) == 0 and router.index.num_blocks(a.url) == 3  # b was hashed the old way
    ctx = router.text_context(DOC, model="m-32")
    assert ctx.block_size == 32 and len(router.context(list(range(100)), model="m-32").hashes) == 3
    assert not router.follow_block_hashing()  # nothing new
    c.scraped.block_size = 64  # m-32's backends now disagree: it falls back to the fleet's hashing
    assert router.follow_block_hashing()
    assert router.hasher_for("m-32") is router.hasher and router.hasher_for("lora-x").block_size == 32


async def test_backend_tokenizer_uses_the_backends_tokenize_for_chat(emulators):
    p = await start_proxy(ProxyConfig(port=0, backends=[e.url for e in emulators], time_scale=TIME_SCALE,
                                      health_interval=0.2, metrics_interval=0.2, tokenizer="backend"))
    try:
        convo = [{"role": "system", "content": DOC}, {"role": "user", "content": "Summarise it."}]
        async with AsyncOpenAI(base_url=p.url + "/v1", api_key="x", max_retries=0) as c:
            r1 = await c.chat.completions.with_raw_response.create(model=MODEL, messages=convo, max_tokens=2)
            r2 = await c.chat.completions.with_raw_response.create(model=MODEL, messages=convo, max_tokens=2)
        assert r1.headers["x-kvroute-backend"] == r2.headers["x-kvroute-backend"]
        matched = int(r2.headers["x-kvroute-matched-blocks"])
        assert matched > 0 and r2.parse().usage.prompt_tokens_details.cached_tokens == 16 * matched
        tok = p.context.backend_tokenizer
        assert (tok.misses, tok.hits) == (1, 1)  # the repeat was answered from the cache
    finally:
        await p.stop()

