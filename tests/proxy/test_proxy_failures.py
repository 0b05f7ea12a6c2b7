"""Failures and guards through the real proxy: failover, mid-stream errors, disconnects, bad input, keys."""
from __future__ import annotations

import asyncio

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from .conftest import MODEL, wait_for
from .test_proxy_routing import ask, document


async def start_server(handler) -> tuple[web.AppRunner, str, list]:
    """A small real HTTP backend with a chosen misbehaviour; records the requests it saw."""
    seen: list = []

    async def recorded(request: web.Request):
        seen.append((request.path, dict(request.headers), await request.read()))
        return await handler(request)

    app = web.Application()
    app.router.add_post("/v1/completions", recorded)
    app.router.add_post("/v1/chat/completions", recorded)
    app.router.add_get("/health", lambda r: web.Response())
    app.router.add_post("/reset_prefix_cache", lambda r: web.Response())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", seen


async def test_killed_backend_is_failed_over_and_marked_unhealthy(make_proxy, emulators):
    proxy = await make_proxy(strategy="round_robin")
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    victim = emulators[1]
    await victim.stop()
    try:
        used = set()
        for i in range(8):
            h, r = await ask(client, document(400 + i, 50))
            used.add(h["x-kvroute-backend"])
            assert r.choices[0].text is not None
        assert victim.url not in used
        backend = proxy.router.registry.get(victim.url)
        assert backend.healthy is False and backend.last_error
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/admin/backends") as r:
                listed = {b["url"]: b for b in (await r.json())["backends"]}
        assert listed[victim.url]["healthy"] is False
        assert all(listed[e.url]["healthy"] for e in emulators if e is not victim)
        assert sum(b["in_flight"] for b in listed.values()) == 0
    finally:
        await client.close()


async def test_5xx_before_first_byte_is_retried_on_another_backend(make_proxy, emulators):
    async def fail(request):
        return web.json_response({"error": {"message": "overloaded", "code": 503}}, status=503)

    runner, bad_url, seen = await start_server(fail)
    try:
        proxy = await make_proxy(backends=[bad_url, emulators[0].url], strategy="round_robin")
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        for _ in range(4):
            h, r = await ask(client, "retry me please", extra_headers={"X-Request-ID": "rid-7"})
            assert h["x-kvroute-backend"] == emulators[0].url
        assert seen and seen[0][1]["X-Request-ID"] == "rid-7"
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/metrics") as m:
                assert 'kvroute_retries_total{reason="status 503"}' in await m.text()
        await client.close()
    finally:
        await runner.cleanup()


async def test_5xx_everywhere_passes_the_backend_error_through(make_proxy):
    async def fail(request):
        return web.json_response({"error": {"message": "overloaded", "type": "ServiceUnavailableError", "code": 503}}, status=503)

    runner, bad_url, _ = await start_server(fail)
    try:
        proxy = await make_proxy(backends=[bad_url])
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            await ask(client, "x")
        assert e.value.status_code == 503
        await client.close()
    finally:
        await runner.cleanup()


async def test_stream_cut_after_first_bytes_ends_with_an_sse_error(make_proxy):
    async def cut(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL,
                 "choices": [{"index": 0, "text": "partial", "logprobs": None, "finish_reason": None}]}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        request.transport.abort()  # the backend dies mid-stream
        return resp

    runner, bad_url, _ = await start_server(cut)
    try:
        proxy = await make_proxy(backends=[bad_url])
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}) as r:
                assert r.status == 200
                body = (await r.read()).decode()
        events = [e[len("data: "):] for e in body.split("\n\n") if e.startswith("data: ")]
        assert orjson.loads(events[0])["choices"][0]["text"] == "partial"
        assert orjson.loads(events[-2])["error"]["code"] == 502
        assert events[-1] == "[DONE]"
        await wait_for(lambda: proxy.router.registry.total_in_flight() == 0, what="in-flight back to zero")
    finally:
        await runner.cleanup()


async def test_client_disconnect_cancels_upstream_and_in_flight_returns_to_zero(proxy, emulators):
    payload = {"model": MODEL, "prompt": document(11, 100), "max_tokens": 3000, "stream": True}
    async with aiohttp.ClientSession() as s:
        r = await s.post(proxy.url + "/v1/completions", json=payload)
        assert r.status == 200
        await r.content.readany()
        assert proxy.router.registry.total_in_flight() == 1
        engine = next(e.engine for e in emulators if e.url == r.headers["x-kvroute-backend"])
        assert engine.block_pool.num_referenced_blocks() > 0
        r.close()  # drop the connection mid-stream
    await wait_for(lambda: proxy.router.registry.total_in_flight() == 0, what="proxy in-flight zero")
    await wait_for(lambda: engine.block_pool.num_referenced_blocks() == 0, what="backend released the request")
    async with aiohttp.ClientSession() as s:
        async with s.get(r.headers["x-kvroute-backend"] + "/metrics") as m:
            metrics = await m.text()
    aborted = [ln for ln in metrics.splitlines() if ln.startswith("vllm:request_success_total") and 'finished_reason="abort"' in ln]
    assert aborted and float(aborted[0].rsplit(" ", 1)[1]) == 1.0  # cancelled upstream, not run to the end


@pytest.mark.parametrize(
    "body, status, param",
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (orjson.dumps({"model": MODEL, "prompt": ""}), 400, "prompt"),
        (orjson.dumps({"model": MODEL, "prompt": []}), 400, "prompt"),
        (orjson.dumps({"model": MODEL}), 400, "prompt"),
        (orjson.dumps({"model": MODEL, "prompt": 42}), 400, "prompt"),
        (orjson.dumps({"model": MODEL, "prompt": "x", "max_tokens": "ten"}), 400, "max_tokens"),
        (orjson.dumps({"model": MODEL, "prompt": "x", "stream": "yes"}), 400, "stream"),
        (orjson.dumps({"model": 7, "prompt": "x"}), 400, "model"),
        (orjson.dumps({"model": "no-such-model", "prompt": "x"}), 404, "model"),
    ],
)
async def test_bad_completion_input_gets_openai_error_json(proxy, body, status, param):
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == status
            err = (await r.json())["error"]
    assert err["code"] == status and err["message"] and err["param"] == param
    assert proxy.router.registry.total_in_flight() == 0


async def test_bad_chat_input_and_oversized_body(make_proxy):
    proxy = await make_proxy(max_body_bytes=4096)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.APIStatusError) as e:
        await client.completions.create(model=MODEL, prompt="x" * 10_000)
    assert e.value.status_code == 413 and e.value.body["code"] == 413
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/v1/nowhere") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == 404
    await client.close()


async def test_api_key_guard(make_proxy):
    proxy = await make_proxy(api_keys=["k1", "k2"])
    bad = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await ask(bad, "hi")
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()
    good = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k2", max_retries=0)
    h, _ = await ask(good, "hi")
    assert h["x-kvroute-backend"]
    await bad.close()
    await good.close()


async def test_admin_key_guard_and_backend_management(make_proxy, emulators):
    proxy = await make_proxy(admin_key="s3cret", backends=[e.url for e in emulators[:3]])
    auth = {"Authorization": "Bearer s3cret"}
    async with aiohttp.ClientSession() as s:
        for method, path in (("GET", "/admin/backends"), ("PUT", "/admin/strategy"), ("POST", "/admin/reset"),
                             ("POST", "/admin/backends"), ("DELETE", "/admin/backends")):
            async with s.request(method, proxy.url + path, headers={"Authorization": "Bearer nope"}) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == 401
        new = emulators[3].url
        async with s.post(proxy.url + "/admin/backends", json={"url": new}, headers=auth) as r:
            assert r.status == 201 and (await r.json())["healthy"] is True
        async with s.post(proxy.url + "/admin/backends", json={"url": new}, headers=auth) as r:
            assert r.status == 200
        async with s.post(proxy.url + "/admin/backends", json={"url": 5}, headers=auth) as r:
            assert r.status == 400
        async with s.get(proxy.url + "/admin/backends", headers=auth) as r:
            listed = (await r.json())["backends"]
        assert [b["url"] for b in listed] == [e.url for e in emulators]
        assert listed[0]["capacity_blocks"] == 923 and listed[0]["indexed_blocks"] == 0
        async with s.delete(proxy.url + "/admin/backends", params={"url": emulators[0].url}, headers=auth) as r:
            assert r.status == 200
        async with s.delete(proxy.url + "/admin/backends", json={"url": emulators[0].url}, headers=auth) as r:
            assert r.status == 404
        async with s.get(proxy.url + "/admin/strategy", headers=auth) as r:
            assert r.status == 200
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    used = {(await ask(client, document(600 + i, 40)))[0]["x-kvroute-backend"] for i in range(6)}
    await client.close()
    assert emulators[0].url not in used and emulators[3].url in used


async def test_reset_clears_index_and_backend_caches(proxy, client):
    doc = document(21)
    await ask(client, doc)
    h, r = await ask(client, doc)
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/admin/reset") as resp:
            body = await resp.json()
    assert resp.status == 200 and body["ok"] is True and len(body["backends"]) == 4
    assert all(v["ok"] for v in body["backends"].values())
    h, r = await ask(client, doc)
    assert h["x-kvroute-matched-blocks"] == "0"
    assert r.usage.prompt_tokens_details.cached_tokens == 0


async def test_concurrent_load_returns_in_flight_to_zero(proxy, client, emulators):
    await asyncio.gather(*(ask(client, document(500 + i % 5, 120) + f" q{i}") for i in range(40)))
    assert proxy.router.registry.total_in_flight() == 0
    await wait_for(lambda: all(e.engine.block_pool.num_referenced_blocks() == 0 for e in emulators), what="backends idle")


async def test_unhealthy_backend_gets_traffic_again_after_it_recovers(make_proxy, emulators):
    from emulator.server import start_emulator

    proxy = await make_proxy(strategy="round_robin")
    victim = emulators[2]
    port, cfg = victim.port, victim.config
    await victim.stop()
    backend = proxy.router.registry.get(victim.url)
    await wait_for(lambda: not backend.healthy, what="health check marks the stopped backend unhealthy")
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    used = {(await ask(client, f"probe {i}"))[0]["x-kvroute-backend"] for i in range(6)}
    assert victim.url not in used
    revived = await start_emulator(cfg.__class__(**{**cfg.to_dict(), "port": port}))
    try:
        await wait_for(lambda: backend.healthy, what="health check marks the restarted backend healthy")
        used = {(await ask(client, f"again {i}"))[0]["x-kvroute-backend"] for i in range(6)}
        assert victim.url in used
    finally:
        await client.close()
        await revived.stop()


async def test_streaming_is_not_buffered(make_proxy):
    """The backend holds its second chunk until the client has seen the first through the proxy."""
    client_saw_first = asyncio.Event()

    async def trickle(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        await asyncio.wait_for(client_saw_first.wait(), 10)
        await resp.write(b'data: {"n": 2}\n\ndata: [DONE]\n\n')
        return resp

    runner, url, _ = await start_server(trickle)
    try:
        proxy = await make_proxy(backends=[url])
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.url + "/v1/completions", json={"prompt": "x", "stream": True}) as r:
                first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
                assert first == b'data: {"n": 1}\n\n'
                client_saw_first.set()
                rest = await r.read()
        assert rest == b'data: {"n": 2}\n\ndata: [DONE]\n\n'
    finally:
        await runner.cleanup()


async def test_backend_added_while_down_gets_no_traffic(make_proxy, emulators):
    proxy = await make_proxy(backends=[emulators[0].url])
    dead = emulators[3]
    await dead.stop()
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/admin/backends", json={"url": dead.url}) as r:
            assert r.status == 201 and (await r.json())["healthy"] is False
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    for i in range(4):
        h, _ = await ask(client, f"hello {i}")
        assert h["x-kvroute-backend"] == emulators[0].url
    await client.close()
