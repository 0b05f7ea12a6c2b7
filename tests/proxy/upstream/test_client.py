"""The hot-path HTTP/1.1 client against raw loopback servers that answer in awkward pieces."""
from __future__ import annotations

import asyncio

import pytest

from proxy.upstream.client import UpstreamError, UpstreamPool, UpstreamTimeout


async def raw_server(answers, split: int | None = None):
    """Serve each connection's requests with the next canned answers, written `split` bytes at a time."""
    seen: list[bytes] = []
    conns = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        conns.append(writer)
        while answers:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            n = int([ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0].split(b":")[1])
            seen.append(head + await reader.readexactly(n))
            answer = answers.pop(0)
            if answer is None:  # close without answering
                writer.close()
                return
            step = split or len(answer)
            for i in range(0, len(answer), step):
                writer.write(answer[i : i + step])
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", seen, conns


CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"7\r\ndata: 1\r\n" b"a;ext=1\r\ndata: 22\n\n\r\n" b"0\r\nX-Trailer: y\r\n\r\n")
LENGTH = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"ok\": true}"


@pytest.mark.parametrize("split", [None, 1, 3, 7])
async def test_chunked_and_length_bodies_in_any_pieces_over_one_connection(split):
    server, url, seen, conns = await raw_server([b"HTTP/1.1 100 Continue\r\n\r\n" + CHUNKED, LENGTH], split)
    pool = UpstreamPool(connect_timeout=2, idle_timeout=5)
    r = await pool.post(url, "/v1/completions", b'{"a":1}', {"Content-Type": "application/json", "X-Request-ID": "r1"})
    assert r.status == 200 and r.content_type == "text/event-stream" and r.charset == "utf-8"
    assert await r.read() == b"data: 1data: 22\n\n"
    r.release()
    r = await pool.post(url, "/v1/completions", b"{}", {})
    assert (r.status, await r.read()) == (200, b'{"ok": true}')
    r.release()
    assert len(conns) == 1  # kept alive and reused
    assert seen[0].startswith(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:") and b"X-Request-ID: r1" in seen[0]
    assert seen[0].endswith(b'Content-Length: 7\r\n\r\n{"a":1}')
    pool.close()
    server.close()


async def test_body_until_eof_and_error_status():
    server, url, _, conns = await raw_server([b"HTTP/1.0 503 Busy\r\nContent-Type: application/json\r\n\r\n{\"error\": 1}"])
    pool = UpstreamPool(2, 5)
    r = await pool.post(url, "/x", b"", {})
    assert r.status == 503 and await r.read() == b'{"error": 1}'
    r.release()
    pool.close()
    server.close()


async def test_cut_mid_body_raises_and_stale_keepalive_is_retried():
    server, url, _, conns = await raw_server([LENGTH, None, LENGTH, CHUNKED[:-10]])
    pool = UpstreamPool(2, 5)
    r = await pool.post(url, "/x", b"{}", {})
    assert await r.read() == b'{"ok": true}'
    r.release()
    # The kept-alive connection gets closed without an answer: the pool retries on a fresh one.
    r = await pool.post(url, "/x", b"{}", {})
    assert await r.read() == b'{"ok": true}'
    r.release()
    r = await pool.post(url, "/x", b"{}", {})
    with pytest.raises(UpstreamError):
        await r.read()
    r.close()
    pool.close()
    server.close()


async def test_idle_timeout_and_refused_connection():
    async def silent(reader, writer):
        await reader.read(100)
        await asyncio.Event().wait()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = UpstreamPool(2, idle_timeout=0.05)
    with pytest.raises(UpstreamTimeout):
        await pool.post(url, "/x", b"{}", {})
    server.close()
    await server.wait_closed()
    with pytest.raises(OSError):
        await pool.post(url, "/x", b"{}", {})
    with pytest.raises(UpstreamError):
        await pool.post("ftp://h", "/x", b"", {})
    pool.close()


async def test_large_body_pauses_reading_until_consumed():
    body = b"x" * (3 << 20)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    server, url, _, _ = await raw_server([answer])
    pool = UpstreamPool(2, 5)
    r = await pool.post(url, "/x", b"", {})
    got = 0
    while chunk := await r.read_chunk():
        got += len(chunk)
    assert got == len(body)
    r.release()
    pool.close()
    server.close()


async def test_chunks_split_anywhere_are_emitted_in_order_and_bad_sizes_fail_the_exchange():
    from proxy.upstream.client import _DONE, UpstreamProtocolError, _Connection

    conn = _Connection(asyncio.get_running_loop())
    conn.start()
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for piece in (b"7\r\ndata: 1\r\n8\r\ndata: 22\r\n", b"4;x=y\r\nda", b"ta\r\n", b"3\r\n333\r\n0\r\n\r\n"):
        conn.data_received(piece)
    assert b"".join(conn._chunks) == b"data: 1data: 22data333" and conn._state == _DONE and conn.exc is None
    for bad in (b"-5\r\nhello\r\n", b"zz\r\n", b"3\r\nabcXY", b"0x9\r\n", b"0_9\r\n"):
        conn = _Connection(asyncio.get_running_loop())
        conn.start()
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.data_received(bad)
        assert isinstance(conn.exc, UpstreamProtocolError) and conn.closed, bad


async def test_bytes_after_a_complete_answer_retire_the_connection():
    server, url, _, conns = await raw_server([LENGTH + b"HTTP/1.1 200 OK\r\n", LENGTH])
    pool = UpstreamPool(2, 5)
    r = await pool.post(url, "/x", b"{}", {})
    assert await r.read() == b'{"ok": true}'
    r.release()
    r = await pool.post(url, "/x", b"{}", {})  # not the connection that carried junk
    assert await r.read() == b'{"ok": true}'
    r.release()
    assert len(conns) == 2
    pool.close()
    server.close()
