"""The standing hostile-input suite (issue #24): raw sockets against a real proxy, fake backends where a
backend must misbehave, resource checks before and after.

One set of connection limits on every path: each slow, stalled or idle shape is run against every
route class (the front door's own route, aiohttp's GET routes, a passthrough route, the admin API,
a chunked upload), with the timeouts scaled down by the config flags. Each case waits for the
proxy's verdict (an answer, a close) with a bound; nothing sleeps to synchronise.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time

import pytest

from emulator.config import EmulatorConfig
from emulator.server import start_emulators
from proxy.config import ProxyConfig
from proxy.app import start_proxy

from .helpers import TIME_SCALE, wait_for

READ_TIMEOUT = 0.3
KEEPALIVE = 0.6
BOUND = 5.0  # the longest any verdict may take (the sweep runs every READ_TIMEOUT / 2)
MAX_BODY = 64 * 1024

OK_BODY = json.dumps({"prompt": "the quick brown fox", "max_tokens": 2}).encode()
CLASSES = {  # route class -> (method, path, a valid body or None)
    "front": ("POST", "/v1/completions", OK_BODY),
    "aiohttp_get": ("GET", "/health", None),
    "metrics": ("GET", "/metrics", None),
    "passthrough": ("POST", "/tokenize", json.dumps({"prompt": "hello"}).encode()),
    "admin": ("PUT", "/admin/strategy", json.dumps({"strategy": "kv_aware"}).encode()),
    "chunked": ("POST", "/v1/completions", OK_BODY),
}
WITH_BODY = [c for c, (_, _, b) in CLASSES.items() if b is not None]


def request(cls: str, body: bytes | None = None, extra: bytes = b"") -> bytes:
    method, path, ok = CLASSES[cls]
    body = ok if body is None else body
    head = b"%b %b HTTP/1.1\r\nHost: x\r\n%b" % (method.encode(), path.encode(), extra)
    if ok is None:
        return head + b"\r\n"
    head += b"Content-Type: application/json\r\n"
    if cls == "chunked":
        return head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    return head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        return status, head, bytes(body)
    length = next((int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")), 0)
    return status, head, await reader.readexactly(length)


@pytest.fixture
async def proxy():
    ems = await start_emulators(EmulatorConfig(port=0, time_scale=TIME_SCALE, log_requests=False), 1)
    p = await start_proxy(ProxyConfig(
        port=0, backends=[ems[0].url], time_scale=TIME_SCALE, client_read_timeout=READ_TIMEOUT,
        client_keepalive_timeout=KEEPALIVE, max_body_bytes=MAX_BODY, max_header_bytes=4096, health_interval=5))
    yield p
    await p.stop()
    await ems[0].stop()


def resources(p) -> dict[str, float]:
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "in_flight": p.context.admission.in_flight,
        "backend_in_flight": sum(b.in_flight for b in p.router.registry),
        "connections": len(p.front.connections) + len(p.front.guarded),
    }


async def verdict(reader: asyncio.StreamReader) -> tuple[int | None, dict | None, bool]:
    """What the proxy does next on this connection: (status, JSON error, closed), within BOUND."""
    async def go():
        try:
            status, head, body = await read_response(reader)
        except asyncio.IncompleteReadError as e:
            assert e.partial == b"", e.partial[:200]
            return None, None, True
        assert not head.startswith(b"HTTP/1.1 100"), "100 Continue before the verdict"
        err = json.loads(body)["error"] if b"application/json" in head.lower() and status >= 400 else None
        closed = (await reader.read()) == b""
        return status, err, closed
    return await asyncio.wait_for(go(), BOUND)


async def run_shape(port: int, cls: str, shape: str) -> tuple[int | None, bool]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if shape.endswith("after_a_first_request"):
            writer.write(request(cls))
            status, _, _ = await asyncio.wait_for(read_response(reader), BOUND)
            assert status < 500, (cls, status)
        t0 = time.monotonic()
        if shape.startswith("slow_head"):
            writer.write(request(cls)[:20])  # the start of a head, and nothing more
        elif shape == "stalled_body":
            full = request(cls, OK_BODY + b" " * 1000)
            writer.write(full[: full.index(b"\r\n\r\n") + 4 + 100])  # the head and 100 body bytes
        elif shape == "idle_after_a_first_request":
            pass
        elif shape == "expect_over_the_limit":
            method, path, _ = CLASSES[cls]
            writer.write(b"%b %b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                         % (method.encode(), path.encode(), MAX_BODY + 1))
        elif shape == "expect_unknown":
            writer.write(request(cls, extra=b"Expect: the-unexpected\r\n"))
        elif shape == "header_too_long":
            writer.write(request(cls, extra=b"X-Big: " + b"a" * 5000 + b"\r\n"))
        status, err, closed = await verdict(reader)
        if err is not None:
            assert err["code"] == status and err["message"], err
        elif status is not None:
            raise AssertionError(f"{cls}/{shape}: {status} without an OpenAI-style JSON error")
        assert time.monotonic() - t0 < BOUND
        return status, closed
    finally:
        writer.close()


SHAPES = {  # shape -> (route classes, expected status; None = closed without an answer)
    "slow_head": (list(CLASSES), 408),
    "slow_head_after_a_first_request": (list(CLASSES), 408),
    "stalled_body": (WITH_BODY, 408),
    "idle_after_a_first_request": (list(CLASSES), None),
    "expect_over_the_limit": (WITH_BODY, 413),
    "expect_unknown": (WITH_BODY, 417),
    "header_too_long": (list(CLASSES), 431),
}


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_every_route_class_has_the_same_connection_limits(proxy, shape):
    classes, expected = SHAPES[shape]
    fds = []
    for _ in range(2):  # the first round also opens the proxy's pooled backend connections
        results = await asyncio.gather(*(run_shape(proxy.port, cls, shape) for cls in classes), return_exceptions=True)
        failures = {cls: r for cls, r in zip(classes, results) if isinstance(r, BaseException) or r != (expected, True)}
        assert not failures, failures
        await wait_for(lambda: resources(proxy)["connections"] == 0 and resources(proxy)["in_flight"] == 0,
                       what="connections and admission back to 0")
        fds.append(resources(proxy)["fds"])
    assert fds[1] <= fds[0] and resources(proxy)["backend_in_flight"] == 0


async def test_stalled_chunked_bodies_release_their_memory_and_slots(proxy):
    """40 chunked uploads that stop before their last chunk (the review: held forever, 40 in flight)."""
    gc.collect()
    tasks_before = len(asyncio.all_tasks())
    fds_before = len(os.listdir("/proc/self/fd"))
    part = b"%x\r\n%b\r\n" % (16 * 1024, b'{"prompt": "' + b"a" * (16 * 1024 - 12))
    conns = []
    for _ in range(40):
        r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
        w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + part * 3)
        conns.append((r, w))
    await wait_for(lambda: proxy.context.admission.in_flight == 40, what="40 uploads admitted")
    for r, _ in conns:
        status, err, closed = await verdict(r)
        assert status == 408 and "stalled" in err["message"] and closed
    for _, w in conns:
        w.close()
    await wait_for(lambda: proxy.context.admission.in_flight == 0 and not proxy.front.guarded, what="slots released")
    await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before, what="tasks back")
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 1


# -- a misbehaving backend --------------------------------------------------------------------------
DIGITS = b"9" * 5000


class AbsurdBackend:
    """Answers sanely except for usage.prompt_tokens: 5,000 digits (beyond Python's int-string limit)."""

    async def start(self) -> AbsurdBackend:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def handle(self, reader, writer) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                if head.startswith(b"GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                elif b'"stream": true' in body:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for e in (b'data: {"choices":[{"index":0,"text":"hi"}]}\n\n',
                              b'data: {"choices":[],"usage":{"prompt_tokens":' + DIGITS + b'}}\n\n', b"data: [DONE]\n\n"):
                        writer.write(b"%x\r\n%b\r\n" % (len(e), e))
                    writer.write(b"0\r\n\r\n")
                else:
                    answer = b'{"choices":[{"index":0,"text":"hi"}],"usage":{"prompt_tokens":' + DIGITS + b"}}"
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                                 % (len(answer), answer))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_an_absurd_usage_value_never_cuts_an_answer(caplog):
    fake = await AbsurdBackend().start()
    p = await start_proxy(ProxyConfig(port=0, backends=[fake.url], retries=0, health_interval=5))
    try:
        with caplog.at_level(logging.WARNING, logger="kvroute.proxy"):
            for _ in range(2):
                for stream in (True, False):
                    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
                    body = json.dumps({"prompt": "hello there", "max_tokens": 2, "stream": stream}).encode()
                    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
                    status, head, data = await asyncio.wait_for(read_response(reader), BOUND)  # chunked: to its 0 chunk
                    writer.close()
                    assert status == 200
                    assert data.rstrip().endswith(b"data: [DONE]") if stream else data.endswith(b"}}")
        bad = p.context.metrics.registry.get_sample_value(
            "kvroute_backend_bad_values_total", {"backend": fake.url, "field": "usage.prompt_tokens"})
        assert bad == 4
        logged = [r for r in caplog.records if "not a sane count" in r.getMessage()]
        assert len(logged) == 1 and not any(r.exc_info for r in caplog.records)
        assert sum(b.in_flight for b in p.router.registry) == 0
    finally:
        await p.stop()
        fake.server.close()
