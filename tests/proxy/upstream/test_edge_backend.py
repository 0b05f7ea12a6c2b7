"""A fake backend (a raw asyncio server) sends each malformed answer shape: the client gets a clean
502 (or an SSE error event and [DONE] once the stream started), never the bad bytes; each drop is
counted in kvroute_upstream_malformed and the proxy keeps serving."""
from __future__ import annotations

import asyncio
import itertools
import json

from collections.abc import Callable, Iterator

import pytest

from proxy.config import ProxyConfig
from proxy.app import start_proxy

from ..edge.test_front import read_response

OK_JSON = b'{"id":"x","object":"text_completion","choices":[{"text":"ok","index":0}]}'
GOOD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(OK_JSON), OK_JSON)
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENT = b'data: {"choices":[{"text":"a","index":0}]}\n\n'
FIRST = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
CAP = 1 << 20  # the test proxy's --max-response-bytes


def chunked(body: bytes, size: bytes | None = None) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + (
        size or b"%x" % len(body)) + b"\r\n" + body + b"\r\n0\r\n\r\n"


def with_length(cl: bytes, body: bytes = OK_JSON) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + cl + b"\r\n\r\n" + body


def status(code: bytes) -> bytes:
    return b"HTTP/1.1 " + code + b" OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


# Non-streamed answers the proxy must not relay.
MALFORMED = {
    "bare LF in Content-Type (Set-Cookie injection)":
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\nSet-Cookie: stolen=1\r\nContent-Length: 2\r\n\r\n{}",
    "NUL in a header value": b"HTTP/1.1 200 OK\r\nContent-Type: application/\x00json\r\nContent-Length: 2\r\n\r\n{}",
    "chunk size 0x9": chunked(b"123456789", b"0x9"),
    "chunk size 0_9": chunked(b"123456789", b"0_9"),
    "chunk size overflow": chunked(b"123456789", b"f" * 20),
    "Content-Length -5": with_length(b"-5"),
    "Content-Length 1_9": with_length(b"1_9"),
    "Content-Length and chunked": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "status -1": status(b"-1"),
    "status 0": status(b"0"),
    "status 000": status(b"000"),
    "status 600": status(b"600"),
    "status 101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    "not HTTP": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "16 MB of trailers": lambda: itertools.chain(
        [chunked(b"{}")[:-2] + b"X-T: "], itertools.repeat(b"a" * 65536, 256), [b"\r\n\r\n"]),
    "16 MB head": lambda: itertools.chain(
        [b"HTTP/1.1 200 OK\r\nX-Big: "], itertools.repeat(b"a" * 65536, 256), [b"\r\n\r\n"]),
    "200 MB declared body": with_length(b"%d" % (200 << 20), b"x" * (2 << 20)),
}
# A non-streamed answer of unknown length is relayed as it arrives (memory bounded by a buffer, not by
# the cap): past the cap it is cut, the client's connection closed before the terminating chunk.
CHUNKED_200MB = lambda: itertools.chain(  # noqa: E731 - written 1 MiB at a time, as long as the proxy reads
    [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"],
    itertools.repeat(b"100000\r\n" + b"x" * 0x100000 + b"\r\n", 200), [b"0\r\n\r\n"])


class FakeBackend:
    """Answers GETs (health, models, metrics) sanely and each POST with `self.answer`, verbatim."""

    def __init__(self) -> None:
        self.answer: bytes | tuple[bytes, bytes] | Callable[[], Iterator[bytes]] = GOOD
        self.go = asyncio.Event()
        self.posts = 0
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def start(self) -> FakeBackend:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if head.startswith(b"GET /v1/models"):
                    models = b'{"object":"list","data":[]}'
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                                 % (len(models), models))
                elif head.startswith(b"GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                else:
                    self.posts += 1
                    if isinstance(self.answer, tuple):  # the second part once the test saw the first relayed
                        writer.write(self.answer[0])
                        await writer.drain()
                        await self.go.wait()
                        writer.write(self.answer[1])
                    elif callable(self.answer):
                        for part in self.answer():
                            writer.write(part)
                            await writer.drain()
                    else:
                        writer.write(self.answer)
                        if b"connection: close" in self.answer[:4096].lower():  # framed by EOF
                            break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
async def fake_proxy():
    fake = await FakeBackend().start()
    proxy = await start_proxy(ProxyConfig(port=0, backends=[fake.url], retries=0, health_interval=60,
                                          max_response_bytes=CAP))
    yield fake, proxy
    await proxy.stop()
    fake.close()


def malformed_count(proxy, url: str) -> float:
    return proxy.context.metrics.registry.get_sample_value("kvroute_upstream_malformed_total", {"backend": url}) or 0.0


async def ask(port: int, stream: bool = False) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"prompt": "hello there", "max_tokens": 2, "stream": stream}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        return await asyncio.wait_for(read_response(reader), 20)
    finally:
        writer.close()


async def test_each_malformed_answer_is_a_clean_counted_502(fake_proxy):
    fake, proxy = fake_proxy
    assert (await ask(proxy.port))[0] == 200
    for i, (name, answer) in enumerate(MALFORMED.items(), start=1):
        fake.answer = answer
        code, headers, body = await ask(proxy.port)
        assert code == 502, (name, code, body[:200])
        assert json.loads(body)["error"]["code"] == 502 and "set-cookie" not in headers, name
        assert malformed_count(proxy, fake.url) == i, name
        fake.answer = GOOD
        b = proxy.router.registry.get(fake.url)  # a malformed answer counts against health: restore it
        proxy.router.registry.set_health(b, True)
        b.failures = 0
        assert (await ask(proxy.port))[0] == 200, f"still serving after {name}"


@pytest.mark.parametrize("tail", [b"0x9\r\n123456789\r\n0\r\n\r\n", b"0\r\nX-T: " + b"a" * (1 << 20) + b"\r\n\r\n"])
async def test_a_stream_that_breaks_framing_ends_with_an_error_event_and_done(fake_proxy, tail):
    fake, proxy = fake_proxy
    fake.answer = (SSE_HEAD + FIRST, tail)
    body = json.dumps({"prompt": "hello there", "max_tokens": 2, "stream": True}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head
    await asyncio.wait_for(reader.readuntil(EVENT + b"\r\n"), 10)
    fake.go.set()
    rest = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 10)
    writer.close()
    events = [e for e in rest.split(b"\r\n")[1].decode().split("\n\n") if e.strip()]
    assert json.loads(events[0].removeprefix("data: "))["error"]["code"] == 502 and events[-1] == "data: [DONE]"
    assert malformed_count(proxy, fake.url) == 1


async def test_an_answer_of_unknown_length_over_the_cap_is_relayed_then_cut(fake_proxy):
    fake, proxy = fake_proxy
    fake.answer = CHUNKED_200MB
    body = json.dumps({"prompt": "hello there", "max_tokens": 2}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
    got = 0
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 20):
        got += len(chunk)
    writer.close()
    assert CAP // 2 < got <= CAP + (2 << 20)  # relayed up to the cap, then the connection closed
    assert malformed_count(proxy, fake.url) == 1
    assert sum(b.in_flight for b in proxy.router.registry) == 0
