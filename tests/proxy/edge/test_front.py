"""The front door over raw sockets: what it serves itself, what it hands to aiohttp, and how a
connection behaves across both (keep-alive, pipelining, split heads, disconnects)."""
from __future__ import annotations

import asyncio
import json

import pytest

from ..conftest import MODEL, wait_for

BODY = json.dumps({"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 3}).encode()


def post(path: str = "/v1/completions", body: bytes = BODY, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: status, lower-cased headers, body (Content-Length or chunked)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        assert headers.get("transfer-encoding") == "chunked"
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        body = b"".join(parts)
    return status, headers, body


@pytest.fixture
async def conn(make_proxy):
    proxy = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    yield proxy, reader, writer
    writer.close()


async def test_keep_alive_across_front_and_aiohttp_routes(conn):
    proxy, reader, writer = conn
    writer.write(post())
    status, headers, body = await read_response(reader)
    assert status == 200 and json.loads(body)["object"] == "text_completion"
    assert headers["x-kvroute-strategy"] == "kv_aware" and headers["x-kvroute-backend"].startswith("http://")
    assert "server" not in headers  # the front answered (aiohttp adds a Server header)
    # A route the front does not serve: the connection goes over to aiohttp and stays usable.
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == 200 and json.loads(body)["data"][0]["id"] == MODEL and "aiohttp" in headers["server"]
    writer.write(post("/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()))
    status, headers, body = await read_response(reader)
    assert status == 200 and json.loads(body)["object"] == "chat.completion" and "aiohttp" in headers["server"]


async def test_pipelined_and_byte_by_byte_requests(conn):
    proxy, reader, writer = conn
    writer.write(post(extra="X-Request-ID: first\r\n") + post(extra="X-Request-ID: second\r\n"))
    ids = [(await read_response(reader))[1]["x-request-id"] for _ in range(2)]
    assert ids == ["first", "second"]
    for b in post(extra="X-Request-ID: third\r\n"):
        writer.write(bytes([b]))
        await writer.drain()
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["x-request-id"] == "third"


async def test_streams_are_chunked_sse_ending_with_done(conn):
    proxy, reader, writer = conn
    body = json.dumps({"model": MODEL, "prompt": "count", "max_tokens": 4, "stream": True}).encode()
    writer.write(post(body=body))
    status, headers, data = await read_response(reader)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in data.decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]" and len(events) >= 5


@pytest.mark.parametrize("extra, body", [
    ("Transfer-Encoding: chunked\r\n", None),
    ("Expect: 100-continue\r\n", BODY),
])
async def test_bodies_the_front_leaves_to_aiohttp(conn, extra, body):
    proxy, reader, writer = conn
    if body is None:
        payload = b"%x\r\n%b\r\n0\r\n\r\n" % (len(BODY), BODY)
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}\r\n".encode() + payload)
    else:
        writer.write(post(extra=extra)[: -len(BODY)])
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 100")
        writer.write(BODY)
    status, headers, data = await read_response(reader)
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 3


async def test_errors_are_openai_json_on_both_paths(conn):
    proxy, reader, writer = conn
    writer.write(post(body=b"{not json"))
    status, _, data = await read_response(reader)
    assert status == 400 and json.loads(data)["error"]["code"] == 400
    writer.write(post(extra="X-Kvroute-Strategy: nope\r\n"))
    status, _, data = await read_response(reader)
    assert status == 400 and "unknown strategy" in json.loads(data)["error"]["message"]
    big = b"x" * (proxy.context.config.max_body_bytes + 1)
    writer.write(post(body=big))  # over the limit: aiohttp answers it
    status, _, data = await read_response(reader)
    assert status == 413 and json.loads(data)["error"]["code"] == 413


async def test_connection_close_is_honoured(conn):
    proxy, reader, writer = conn
    writer.write(post(extra="Connection: close\r\n"))
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 10) == b""


async def test_a_client_leaving_mid_stream_frees_everything(conn):
    proxy, reader, writer = conn
    body = json.dumps({"model": MODEL, "prompt": "long", "max_tokens": 2000, "stream": True}).encode()
    writer.write(post(body=body))
    await asyncio.wait_for(reader.readuntil(b"data: "), 10)
    assert sum(b.in_flight for b in proxy.router.registry) == 1
    writer.transport.abort()
    await wait_for(lambda: sum(b.in_flight for b in proxy.router.registry) == 0, what="in-flight back to 0")
    await wait_for(lambda: not proxy.front.connections, what="connection gone")
