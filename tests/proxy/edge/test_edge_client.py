"""Malformed client heads over raw sockets: the front door answers each as aiohttp's own server does
or more strictly, at once (never the idle sweep), and keeps serving; slow heads end in 408 while a
slow-but-steady body completes."""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from ..conftest import MODEL, wait_for
from .test_front import read_response

BODY = json.dumps({"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 2}).encode()
CL = f"Content-Length: {len(BODY)}\r\n".encode()
POST = b"POST /v1/completions HTTP/1.1\r\n"
VERDICT_TIMEOUT = 5.0

# name -> raw bytes; None in MUST_REJECT means "any 4xx".
SHAPES: dict[str, bytes] = {
    "valid": POST + b"Host: x\r\n" + CL + b"\r\n" + BODY,
    "bare LF line ends": b"GET /health HTTP/1.1\nHost: x\n\n",
    "bare LF POST": POST.replace(b"\r\n", b"\n") + b"Host: x\n" + CL.replace(b"\r\n", b"\n") + b"\n" + BODY,
    "NUL in a value": POST + b"Host: x\r\nX-Foo: a\x00b\r\n" + CL + b"\r\n" + BODY,
    "bare CR in a value": POST + b"Host: x\r\nX-Foo: a\rb\r\n" + CL + b"\r\n" + BODY,
    "bare LF in a value (smuggling)": POST + b"Host: x\r\nX-Foo: a\nTransfer-Encoding: chunked\r\n" + CL + b"\r\n" + BODY,
    "0x01 in a name": POST + b"Host: x\r\nX-F\x01o: a\r\n" + CL + b"\r\n" + BODY,
    "space in a name": POST + b"Host: x\r\nTransfer Encoding: chunked\r\n" + CL + b"\r\n" + BODY,
    "no Host": POST + CL + b"\r\n" + BODY,
    "two Host": POST + b"Host: x\r\nHost: y\r\n" + CL + b"\r\n" + BODY,
    "CL and TE": POST + b"Host: x\r\n" + CL + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two differing CL": POST + b"Host: x\r\n" + CL + b"Content-Length: 3\r\n\r\n" + BODY,
    "obs-fold": POST + b"Host: x\r\nX-Foo: a\r\n b\r\n" + CL + b"\r\n" + BODY,
    "absolute-form": b"POST http://x/v1/completions HTTP/1.1\r\nHost: x\r\n" + CL + b"\r\n" + BODY,
    "huge request line": b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "huge header value": POST + b"Host: x\r\nX-Foo: " + b"a" * 20_000 + b"\r\n" + CL + b"\r\n" + BODY,
    "too many headers": POST + b"Host: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(300)) + CL + b"\r\n" + BODY,
    "HTTP/2.0 in HTTP/1 framing": b"POST /v1/completions HTTP/2.0\r\nHost: x\r\n" + CL + b"\r\n" + BODY,
    "negative CL": POST + b"Host: x\r\nContent-Length: -5\r\n\r\n" + BODY,
    "space in the target": b"GET /he alth HTTP/1.1\r\nHost: x\r\n\r\n",
}
MUST_REJECT = set(SHAPES) - {"valid", "absolute-form"}


async def verdict(port: int, raw: bytes) -> int:
    """The status a server answers `raw` with (0: it closed without answering); a hang fails."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        try:
            line = await asyncio.wait_for(reader.readline(), VERDICT_TIMEOUT)
        except ConnectionError:
            return 0
        if not line:
            return 0
        return int(line.split()[1])
    finally:
        writer.close()


@pytest.fixture
async def bare_aiohttp():
    """aiohttp's own server with the same routes and limits, answering 200: the reference verdicts."""

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/completions", ok)
    app.router.add_get("/health", ok)
    runner = web.AppRunner(app, access_log=None, max_line_size=8190, max_field_size=8190)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1]
    await runner.cleanup()


async def test_each_malformed_head_gets_aiohttps_verdict_or_stricter_and_the_proxy_keeps_serving(make_proxy, bare_aiohttp):
    proxy = await make_proxy()
    rows = []
    for name, raw in SHAPES.items():
        ref = await verdict(bare_aiohttp, raw)
        got = await verdict(proxy.port, raw)
        rows.append((name, ref, got))
        assert await verdict(proxy.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") == 200, name
    print("\n".join(f"{n:32s} aiohttp {r:3d}  kvroute {g:3d}" for n, r, g in rows))
    for name, ref, got in rows:
        if ref == 0 or ref >= 400 or name in MUST_REJECT:
            assert 400 <= got < 600, (name, ref, got)
        else:
            assert got == ref, (name, ref, got)
    assert dict((n, g) for n, _, g in rows)["valid"] == 200


async def test_a_rejected_head_is_answered_as_openai_json_and_closed(make_proxy):
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(SHAPES["bare LF in a value (smuggling)"])
    status, headers, body = await read_response(reader)
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == 400
    assert await asyncio.wait_for(reader.read(), VERDICT_TIMEOUT) == b""
    writer.close()


async def test_pipelined_requests_are_answered_in_order_until_the_malformed_one(make_proxy):
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    valid = SHAPES["valid"]
    writer.write(valid + valid + b"GET /health HTTP/1.1\nHost: x\n\n" + valid)
    assert [(await read_response(reader))[0] for _ in range(3)] == [200, 200, 400]
    assert await asyncio.wait_for(reader.read(), VERDICT_TIMEOUT) == b""  # nothing after the bad one
    writer.close()


async def test_slowloris_head_gets_408_while_a_slow_but_steady_body_completes(make_proxy):
    proxy = await make_proxy(client_read_timeout=1.0)
    proxy.front.keepalive_s = 0.2  # the idle sweep would cut anything it took for idle
    # A head that never ends, one header every 0.1 s: cut after the read timeout (the sweep runs every 0.5 s).
    r1, w1 = await asyncio.open_connection("127.0.0.1", proxy.port)
    w1.write(POST + b"Host: x\r\n")

    async def drip_head() -> None:
        for i in range(40):
            w1.write(b"X-%d: a\r\n" % i)
            await asyncio.sleep(0.1)

    dripper = asyncio.create_task(drip_head())
    status, _, body = await read_response(r1)
    assert status == 408 and "head" in json.loads(body)["error"]["message"]
    dripper.cancel()
    w1.close()
    # A body sent 20 bytes every 0.1 s: it takes twice the read timeout in all, but keeps progressing.
    body = json.dumps({"model": MODEL, "prompt": "w " * 180, "max_tokens": 2}).encode()
    assert len(body) >= 400
    r2, w2 = await asyncio.open_connection("127.0.0.1", proxy.port)
    w2.write(POST + b"Host: x\r\nContent-Length: %d\r\n\r\n" % len(body))
    for i in range(0, len(body), 20):
        w2.write(body[i : i + 20])
        await asyncio.sleep(0.1)
    status, _, data = await read_response(r2)
    assert status == 200 and json.loads(data)["object"] == "text_completion"
    # A body that stops arriving: 408 after the read timeout.
    w2.write(POST + b"Host: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
    status, _, data = await read_response(r2)
    assert status == 408 and "stalled" in json.loads(data)["error"]["message"]
    w2.close()
    await wait_for(lambda: not proxy.front.connections, what="connections closed")


async def test_a_client_still_sending_when_rejected_reads_the_answer_not_a_reset(make_proxy):
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(POST + b"Host: x\r\nX-Big: " + b"v" * 70_000 + b"\r\nContent-Length: 600000\r\n\r\n" + b"x" * 600_000)
    await writer.drain()  # the proxy reads (and drops) the rest after answering, so this completes
    status, headers, body = await read_response(reader)
    assert status == 431 and json.loads(body)["error"]["code"] == 431
    assert await asyncio.wait_for(reader.read(), VERDICT_TIMEOUT) == b""
    writer.close()
