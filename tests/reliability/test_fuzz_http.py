"""Property-based fuzzing of HTTP framing, both directions (not only of JSON bodies).

Client heads: each generated (and byte-mutated) head is sent over a raw socket to aiohttp's own
server and to the proxy; the proxy answers whatever aiohttp rejects with a 4xx/5xx too, never
hangs where aiohttp answers, never 500s, and keeps serving. Backend answers: each generated (and
mutated) answer, split at random points, is either parsed to exactly the body sent or fails with
`UpstreamProtocolError`, never relaying a header value with CR, LF or NUL; end to end through the
proxy the client gets that body or a 502, never a hang.
"""
from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.config import EmulatorConfig
from emulator.server import start_emulators
from proxy.config import ProxyConfig
from proxy.app import start_proxy
from proxy.upstream.client import UpstreamError, UpstreamProtocolError, _Connection

from .helpers import MODEL
from .test_fuzz import LoopThread

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
ANSWER_TIMEOUT = 3.0  # a server that has everything it needs answers well within this
WAIT_TIMEOUT = 0.5  # how long "still waiting for more bytes" is given when aiohttp waits too
BODY = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
NASTY = [b"\x00", b"\r", b"\n", b"\x01", b" ", b"\t", b":", b"\x7f", b"\xff", b"\r\n", b"\r\n ", b",", b"-"]


# -- client heads ----------------------------------------------------------------------------------
@st.composite
def heads(draw) -> bytes:
    method = draw(st.sampled_from([b"POST"] * 4 + [b"GET", b"PUT", b"P0ST"]))
    target = draw(st.sampled_from([b"/v1/completions"] * 3 + [b"/v1/chat/completions", b"/health", b"http://h/v1/completions", b"*"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 5 + [b"HTTP/1.0", b"HTTP/1.2"]))
    eol = draw(st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r"]))
    fields = [(b"Host", b"x")] if draw(st.integers(0, 9)) < 9 else []  # hypothesis favours small draws
    fields += draw(st.lists(st.tuples(
        st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"X-Foo", b"Connection", b"Expect", b"Authorization"]),
        st.sampled_from([b"x", b"chunked", b"close", b"keep-alive", b"5", b"-1", b"1_0", b"100-continue", b"a b", b"Bearer k"]),
    ), max_size=2))
    if draw(st.integers(0, 4)) < 4:
        fields.append((b"Content-Length", b"%d" % len(BODY)))
    lines = [method + b" " + target + b" " + version] + [k + b": " + v for k, v in fields]
    head = eol.join(lines) + eol
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):  # mutations inside the head, never in its final blank line
        i = draw(st.integers(0, len(head) - 1))
        head = head[:i] + draw(st.sampled_from(NASTY)) + head[i + draw(st.integers(0, 1)):]
    return head + eol + BODY


async def verdict(port: int, raw: bytes, timeout: float) -> int | None:
    """Status answered (0: closed without answer, None: still waiting after `timeout`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        line = await asyncio.wait_for(reader.readline(), timeout)
        return int(line.split()[1]) if line else 0
    except asyncio.TimeoutError:
        return None
    except ConnectionError:
        return 0
    finally:
        writer.close()


@pytest.fixture(scope="module")
def servers():
    lt = LoopThread()

    async def up():
        ems = await start_emulators(EmulatorConfig(port=0, time_scale=0.001, log_requests=False), 1)
        proxy = await start_proxy(ProxyConfig(port=0, backends=[ems[0].url], time_scale=0.001, health_interval=0.5))

        async def ok(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(text="ok")

        app = web.Application()
        for path in ("/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, ok)
        app.router.add_get("/health", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return ems, proxy, runner, site._server.sockets[0].getsockname()[1]

    ems, proxy, runner, aio_port = lt.run(up())
    yield lt, proxy, aio_port

    async def down():
        await proxy.stop()
        await runner.cleanup()
        for e in ems:
            await e.stop()

    lt.run(down())
    lt.close()


def test_fuzzed_heads_get_aiohttps_verdict_or_stricter(servers):
    lt, proxy, aio_port = servers

    @FAST
    @given(raw=heads())
    def run(raw):
        async def one():
            ref = await verdict(aio_port, raw, WAIT_TIMEOUT)
            got = await verdict(proxy.port, raw, ANSWER_TIMEOUT if ref is not None else WAIT_TIMEOUT)
            if ref is None and got is not None and got < 400:  # aiohttp slow (a loaded machine) or truly waiting?
                ref = await verdict(aio_port, raw, ANSWER_TIMEOUT)
            if ref is not None:
                assert got is not None, ("proxy hangs where aiohttp answers", raw, ref)
            if ref is None or ref == 0 or ref >= 400:
                assert got is None or got == 0 or 400 <= got < 600, (raw, ref, got)
            assert got != 500, raw
            assert await verdict(proxy.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", ANSWER_TIMEOUT) == 200

        lt.run(one())

    run()


# -- backend answers -------------------------------------------------------------------------------
@st.composite
def answers(draw) -> tuple[bytes, bytes, bool]:
    """(raw answer, its body, whether it was generated valid and left unmutated)."""
    status = draw(st.sampled_from([200, 200, 404, 503, 204, 0, 99, 600, 1000]))
    body = b"" if status == 204 else draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked", "eof"]))
    value = draw(st.sampled_from([b"application/json", b"text/event-stream; charset=utf-8", b"a\nSet-Cookie: x=1", b"a\x00b", b"a\rb"]))
    head = b"HTTP/1.1 %d X\r\nContent-Type: %b\r\n" % (status, value)
    if framing == "length":
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        payload = body
    elif framing == "chunked":
        sizes = draw(st.lists(st.integers(1, 64), max_size=6))
        parts, pos = [], 0
        for n in sizes:
            parts.append(body[pos : pos + n])
            pos += n
        if pos < len(body):
            parts.append(body[pos:])
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        payload = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"
    else:
        head += b"Connection: close\r\n\r\n"
        payload = body
    raw = head + payload
    valid = 100 <= status <= 599 and value[:1] in (b"a", b"t") and b"\n" not in value and b"\x00" not in value and b"\r" not in value
    if draw(st.booleans()):  # mutate a byte of the head or the framing
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + draw(st.sampled_from(NASTY + [b"0x", b"_", b"-"])) + raw[i + 1:]
        valid = False
    return raw, body, valid


def split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(answer=answers(), cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_fuzzed_backend_answers_parse_exactly_or_fail_cleanly(answer, cuts):
    raw, body, valid = answer
    loop = asyncio.new_event_loop()
    try:
        conn = _Connection(loop)
        conn.start()
        for piece in split(raw, cuts):
            if conn.closed:
                break
            conn.data_received(piece)
        if not conn.closed:
            conn.connection_lost(None)
        for v in conn.headers.values():
            assert not any(c in v for c in "\r\n\x00"), v
        if conn.exc is None:
            assert 100 <= conn.status <= 599
        else:
            assert isinstance(conn.exc, UpstreamError)
        if valid:
            assert conn.exc is None and b"".join(conn._chunks) == body, (raw, conn.exc)
    finally:
        loop.close()


def test_fuzzed_backend_answers_reach_the_client_exactly_or_as_502():
    from tests.proxy.upstream.test_edge_backend import FakeBackend, ask

    lt = LoopThread()

    async def up():
        fake = await FakeBackend().start()
        proxy = await start_proxy(ProxyConfig(port=0, backends=[fake.url], retries=0, health_interval=60))
        return fake, proxy

    fake, proxy = lt.run(up())
    try:
        @settings(max_examples=60, deadline=None, derandomize=True)
        @given(answer=answers())
        def run(answer):
            raw, body, valid = answer
            fake.answer = raw

            async def one():
                b = proxy.router.registry.get(fake.url)
                proxy.router.registry.set_health(b, True)
                b.failures = 0
                return await ask(proxy.port)

            status, headers, got = lt.run(one())
            assert "set-cookie" not in headers
            if valid and status < 500:
                assert got == body
            assert status != 500, (raw, got[:200])
            assert status in (200, 204, 404, 503, 502), (raw, status)

        run()
    finally:
        async def down():
            await proxy.stop()
            fake.close()

        lt.run(down())
        lt.close()
