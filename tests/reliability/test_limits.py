"""Limits a hostile or careless client hits, each answered with an OpenAI-style 4xx; keys never leak."""
from __future__ import annotations

import logging

import aiohttp
import pytest

from emulator.config import EmulatorConfig
from emulator.faults import FaultConfig
from emulator.server import STATE, start_emulators
from proxy.config import ProxyConfig
from proxy.app import start_proxy

from .helpers import MODEL, TIME_SCALE, metric_samples, wait_for

API_KEY = "sk-limits-SECRET-4f9a2c"
OTHER_KEY = "sk-limits-OTHER-77aa"
ADMIN_KEY = "adm-SECRET-31c7"


@pytest.fixture
async def stack():
    # A small context (512) the proxy must learn from the backends' /v1/models (its own default is 4096).
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False, max_model_len=512), 2)
    proxy = await start_proxy(ProxyConfig(
        port=0, backends=[e.url for e in ems], time_scale=TIME_SCALE, api_keys=[API_KEY, OTHER_KEY], admin_key=ADMIN_KEY,
        max_body_bytes=64 * 1024, max_concurrent_per_key=2, max_header_bytes=4096, health_interval=0.2,
    ))
    await wait_for(lambda: all(b.max_model_len == 512 for b in proxy.router.registry), what="max_model_len learned")
    yield proxy, ems
    await proxy.stop()
    for e in ems:
        await e.stop()


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def expect_error(resp: aiohttp.ClientResponse, status: int, param: str | None = None) -> dict:
    assert resp.status == status, (resp.status, await resp.text())
    assert resp.content_type == "application/json"
    err = (await resp.json())["error"]
    assert err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


async def test_body_prompt_and_max_tokens_limits(stack):
    proxy, ems = stack
    url = proxy.url + "/v1/completions"
    async with aiohttp.ClientSession(headers=auth()) as s:
        async with s.post(url, data=b'{"prompt": "' + b"a" * 70_000 + b'"}') as r:
            await expect_error(r, 413)

        async def chunked():
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"b" * 8192
            yield b'"}'

        async with s.post(url, data=chunked()) as r:  # no Content-Length: the limit still holds
            await expect_error(r, 413)
        long_prompt = "word " * 600  # ~600 tokens > 512
        async with s.post(url, json={"model": MODEL, "prompt": long_prompt, "max_tokens": 4}) as r:
            err = await expect_error(r, 400, "prompt")
            assert "maximum context length is 512" in err["message"]
        async with s.post(proxy.url + "/v1/chat/completions",
                          json={"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]}) as r:
            await expect_error(r, 400, "messages")
        async with s.post(url, json={"model": MODEL, "prompt": "short prompt", "max_tokens": 600}) as r:
            await expect_error(r, 400, "max_tokens")
        async with s.post(url, json={"model": MODEL, "prompt": "short prompt", "max_tokens": 490}) as r:
            assert r.status == 200  # within the limit
    # None of the rejected requests reached a backend: only the last one was routed.
    assert sum(b.processed for b in proxy.router.registry) == 1


async def test_oversized_and_too_many_headers_get_json_errors_without_echo(stack):
    proxy, _ = stack
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/completions", json={"prompt": "hi"},
                          headers={**auth(), "X-Big": "z" * 5000 + API_KEY}) as r:
            err = await expect_error(r, 431)
            assert API_KEY not in err["message"] and "zzz" not in await r.text()
        many = {f"X-H{i}": "v" for i in range(200)}
        async with s.post(proxy.url + "/v1/completions", json={"prompt": "hi"}, headers={**auth(), **many}) as r:
            assert r.status in (400, 431)
            await expect_error(r, r.status)


async def test_concurrent_requests_per_key_beyond_the_limit_get_429(stack):
    proxy, ems = stack
    url = proxy.url + "/v1/completions"
    slow = {"model": MODEL, "prompt": "a slow stream", "max_tokens": 400, "stream": True}
    async with aiohttp.ClientSession() as s:
        held = [await s.post(url, json=slow, headers=auth()) for _ in range(2)]
        try:
            for h in held:
                assert h.status == 200
                await h.content.readany()  # both are streaming now
            async with s.post(url, json=slow, headers=auth()) as r:
                err = await expect_error(r, 429)
                assert err["type"] == "RateLimitError" and API_KEY not in err["message"]
            async with s.post(url, json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, headers=auth(OTHER_KEY)) as r:
                assert r.status == 200  # another key is not affected
            async with s.get(proxy.url + "/metrics") as m:
                text = await m.text()
            assert metric_samples(text, "kvroute_requests_in_flight")[()] == 2
            assert API_KEY not in text
        finally:
            for h in held:
                h.close()  # the client leaves mid-stream
        await wait_for(lambda: proxy.context.admission.in_flight == 0, what="admission released")
        async with s.post(url, json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, headers=auth()) as r:
            assert r.status == 200
    await wait_for(lambda: all(e.engine.block_pool.num_referenced_blocks() == 0 for e in ems), what="blocks freed")


async def test_admin_needs_its_key_and_proxy_binds_loopback_by_default(stack):
    proxy, _ = stack
    async with aiohttp.ClientSession() as s:
        for method, path in (("GET", "/admin/backends"), ("PUT", "/admin/strategy"), ("POST", "/admin/reset"),
                             ("DELETE", "/admin/backends")):
            for headers in ({}, auth(API_KEY), {"Authorization": f"Bearer {ADMIN_KEY}x"}):
                async with s.request(method, proxy.url + path, headers=headers, json={"strategy": "random"}) as r:
                    await expect_error(r, 401)
        async with s.get(proxy.url + "/admin/backends", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
            assert r.status == 200 and len((await r.json())["backends"]) == 2
        async with s.post(proxy.url + "/v1/completions", json={"prompt": "hi"}) as r:
            await expect_error(r, 401)
    assert ProxyConfig().host == "127.0.0.1"
    default = await start_proxy(ProxyConfig(port=0, backends=[]))
    try:
        addrs = [a[0] for a in default.addresses]
        assert addrs == ["127.0.0.1"], addrs
    finally:
        await default.stop()


async def test_api_keys_never_appear_in_logs(stack, caplog, capfd):
    proxy, ems = stack
    caplog.set_level(logging.DEBUG)
    url = proxy.url + "/v1/completions"
    async with aiohttp.ClientSession() as s:
        for key in (API_KEY, OTHER_KEY, API_KEY + "-wrong"):
            async with s.post(url, json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, headers=auth(key)) as r:
                await r.read()
            async with s.post(url, data=b"{not json", headers=auth(key)) as r:
                await r.read()
            async with s.post(url, json={"prompt": "hi"}, headers={**auth(key), "X-Big": key * 1000}) as r:
                await r.read()
            async with s.get(proxy.url + "/admin/backends", headers=auth(key)) as r:
                await r.read()
        # A mid-stream failure logs a warning; it must not carry the key either.
        for e in ems:
            e.app[STATE].faults.config = FaultConfig(cut_after=2)
        async with s.post(url, json={"model": MODEL, "prompt": "cut me", "max_tokens": 8, "stream": True}, headers=auth()) as r:
            body = await r.read()
        assert b'"error"' in body and body.endswith(b"data: [DONE]\n\n")
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "retrying" in logged or "mid-stream" in logged or "rejected" in logged  # the logs were captured
    for secret in (API_KEY, OTHER_KEY, ADMIN_KEY):
        assert secret not in logged
