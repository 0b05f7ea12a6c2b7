"""A small keep-alive HTTP/1.1 client for the hot path: POST a JSON body, stream the answer back.

aiohttp's client costs about 180 us of CPU per request here, as much as tokenizing a prompt, so
forwarding uses this instead (health checks, scrapes and admin calls still use aiohttp). It speaks
just what a vLLM-compatible backend answers: a Content-Length body, chunked transfer encoding, or a
body up to EOF; it hands body bytes to the caller as they arrive (chunked framing removed), pauses
reading when the caller falls behind, and closes the connection when a response is abandoned, so
the backend sees the disconnect and aborts the request.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as ssl_mod
from collections import deque
from collections.abc import Awaitable
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
HIGH_WATER = 1 << 20

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_EOF, _DONE = range(8)


class UpstreamError(Exception):
    """The backend broke the HTTP exchange (closed, reset, malformed answer)."""


class UpstreamTimeout(TimeoutError):
    """The backend was silent for longer than the idle timeout."""


def _chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (extensions after ';' ignored)."""
    try:
        size = int(line.split(b";", 1)[0], 16)
    except ValueError:
        raise UpstreamError("bad chunk size") from None
    if size < 0:
        raise UpstreamError("bad chunk size")
    return size


class _Connection(asyncio.Protocol):
    """One TCP connection; parses one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.exc: BaseException | None = None
        self._buf = bytearray()
        self._state = _DONE
        self._remaining = 0
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future | None = None
        self._wait_started = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.got_bytes = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = True

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _UNTIL_EOF:
            self._state = _DONE
        elif self._state != _DONE and self.exc is None:
            self.exc = UpstreamError(f"backend closed the connection{': ' + str(exc) if exc else ''}")
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._feed(data)
        except UpstreamError as e:
            self.exc = e
            self.close()
        self._wake()

    def eof_received(self) -> bool:
        return False

    # -- parsing --------------------------------------------------------------------------------
    def start(self) -> None:
        self._buf.clear()
        self._state = _HEAD
        self._chunks.clear()
        self._buffered = 0
        self.got_bytes = False
        self.exc = None
        self.status = 0
        self.headers = {}

    def _emit(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()

    def _feed(self, data: bytes) -> None:
        state = self._state
        if state == _LENGTH and not self._buf:  # fast path: body bytes of a Content-Length answer
            n = len(data)
            if n <= self._remaining:
                self._remaining -= n
                self._emit(data)
                if not self._remaining:
                    self._state = _DONE
                return
        if state == _UNTIL_EOF:
            self._emit(data)
            return
        if state == _CHUNK_SIZE and not self._buf:
            data = self._whole_chunks(data)
            if not data:
                return
        buf = self._buf
        buf += data
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise UpstreamError("response head too large")
                    return
                self._parse_head(bytes(buf[:end]))
                del buf[: end + 4]
            elif state == _LENGTH:
                n = min(self._remaining, len(buf))
                self._emit(bytes(buf[:n]))
                del buf[:n]
                self._remaining -= n
                if not self._remaining:
                    self._state = _DONE
                return
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise UpstreamError("bad chunk header")
                    return
                size = _chunk_size(bytes(buf[:end]))
                del buf[: end + 2]
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if not buf:
                    return
                n = min(self._remaining, len(buf))
                self._emit(bytes(buf[:n]))
                del buf[:n]
                self._remaining -= n
                if not self._remaining:
                    self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise UpstreamError("bad chunk terminator")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._state = _DONE
            elif state == _UNTIL_EOF:
                self._emit(bytes(buf))
                buf.clear()
                return
            else:  # _DONE: bytes after a complete answer are a protocol error
                if buf:
                    self.keep_alive = False
                    buf.clear()
                return

    def _whole_chunks(self, data: bytes) -> bytes:
        """Fast path for a stream (one SSE event per chunk, usually one chunk per read): emit the
        complete data chunks at the start of `data` straight from it; return what is left for the
        state machine (a partial chunk, the last chunk, trailers)."""
        pos, n = 0, len(data)
        out = []
        while True:
            end = data.find(b"\r\n", pos, pos + 1024)
            if end < 0:
                break
            size = _chunk_size(data[pos:end])
            stop = end + 2 + size
            if size == 0 or stop + 2 > n:
                break
            if data[stop : stop + 2] != b"\r\n":
                raise UpstreamError("bad chunk terminator")
            out.append(data[end + 2 : stop])
            pos = stop + 2
        if out:
            self._emit(out[0] if len(out) == 1 else b"".join(out))
        return data[pos:] if pos else data

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise UpstreamError(f"bad status line {lines[0][:80]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise UpstreamError(f"bad status line {lines[0][:80]!r}") from None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        if 100 <= status < 200:  # informational: the real answer follows
            return
        self.status = status
        self.headers = headers
        conn = headers.get("connection", "").lower()
        self.keep_alive = parts[0] == "HTTP/1.1" and conn != "close" or conn == "keep-alive"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif "content-length" in headers:
            try:
                self._remaining = int(headers["content-length"])
            except ValueError:
                raise UpstreamError("bad content-length") from None
            self._state = _LENGTH if self._remaining else _DONE
        elif status in (204, 304):
            self._state = _DONE
        else:
            self.keep_alive = False
            self._state = _UNTIL_EOF

    # -- consumer side --------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        """Wait for bytes; a wait longer than `timeout` fails. One lazily re-armed timer serves every
        wait of the connection (a stream waits once per chunk), instead of a timer per wait."""
        loop = self.loop
        self._waiter = loop.create_future()
        self._wait_started = loop.time()
        if timeout and self._timer is None:
            self._timer = loop.call_later(timeout, self._check_idle, timeout)
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _check_idle(self, timeout: float) -> None:
        self._timer = None
        w = self._waiter
        if w is None or w.done():
            return
        waited = self.loop.time() - self._wait_started
        if waited >= timeout:
            w.set_exception(UpstreamTimeout("backend idle timeout"))
        else:
            self._timer = self.loop.call_later(timeout - waited, self._check_idle, timeout)

    async def wait_head(self, timeout: float | None) -> None:
        while self.status == 0:
            if self.exc is not None:
                raise self.exc
            if self.closed:
                raise UpstreamError("backend closed the connection before answering")
            await self._wait(timeout)
        if self.exc is not None:
            raise self.exc

    async def read_chunk(self, timeout: float | None) -> bytes:
        """All body bytes received so far (waiting only when there are none); b"" at the end of the body."""
        while True:
            if self._chunks:
                # Everything already received goes out in one write (never waiting to gather more).
                data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._paused and self._buffered < HIGH_WATER // 4 and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._state == _DONE:
                return b""
            if self.exc is not None:
                raise self.exc
            if self.closed:
                raise UpstreamError("backend closed the connection mid-body")
            await self._wait(timeout)

    @property
    def complete(self) -> bool:
        return self._state == _DONE and not self._chunks and self.exc is None

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """One backend answer; `release()` after a full read recycles the connection, `close()` drops it."""

    def __init__(self, pool: UpstreamPool, conn: _Connection, idle_timeout: float | None) -> None:
        self._pool = pool
        self._conn = conn
        self._idle = idle_timeout
        self.status = conn.status
        self.headers = conn.headers
        ctype = conn.headers.get("content-type", "application/octet-stream")
        self.content_type, _, params = ctype.partition(";")
        self.content_type = self.content_type.strip()
        self.charset = None
        if "charset=" in params:
            self.charset = params.split("charset=", 1)[1].split(";")[0].strip().strip('"') or None
        self._done = False

    def read_chunk(self) -> Awaitable[bytes]:
        """The body bytes received so far (waiting for some), b"" at the end (one coroutine, not two)."""
        return self._conn.read_chunk(self._idle)

    async def read(self) -> bytes:
        parts = []
        while True:
            chunk = await self._conn.read_chunk(self._idle)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    def release(self) -> None:
        if self._done:
            return
        self._done = True
        c = self._conn
        if c.complete and c.keep_alive and not c.closed:
            self._pool._put(c)
        else:
            c.close()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._conn.close()


class UpstreamPool:
    """Keep-alive connections per backend origin, shared by all requests of one proxy."""

    def __init__(self, connect_timeout: float, idle_timeout: float | None, max_idle_per_origin: int = 256) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle_per_origin
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._origins: dict[str, tuple[tuple[str, str, int], bytes, bytes]] = {}
        self._ssl: ssl_mod.SSLContext | None = None

    def _origin(self, base_url: str, path: str) -> tuple[tuple[str, str, int], bytes]:
        key = base_url + path
        hit = self._origins.get(key)
        if hit is None:
            u = urlsplit(base_url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise UpstreamError(f"not an http(s) URL: {base_url!r}")
            port = u.port or (443 if u.scheme == "https" else 80)
            host_hdr = u.hostname if u.port is None else f"{u.hostname}:{u.port}"
            if ":" in u.hostname:
                host_hdr = f"[{u.hostname}]" + (f":{u.port}" if u.port else "")
            prefix = u.path.rstrip("/")
            line = f"POST {prefix}{path} HTTP/1.1\r\nHost: {host_hdr}\r\n".encode("latin-1")
            hit = self._origins[key] = ((u.scheme, u.hostname, port), line, b"")
        return hit[0], hit[1]

    def _put(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin, [])  # type: ignore[attr-defined]
        if len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, origin: tuple[str, str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        scheme, host, port = origin
        ssl_ctx = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl_mod.create_default_context()
            ssl_ctx = self._ssl
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await loop.create_connection(lambda: _Connection(loop), host, port, ssl=ssl_ctx)
        conn.origin = origin  # type: ignore[attr-defined]
        return conn

    async def post(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """Send the request and wait for the response head (the caller bounds the wait)."""
        origin, line = self._origin(base_url, path)
        head = line + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            try:
                return await self._send(conn, head, body)
            except UpstreamError:
                if conn.got_bytes:
                    raise
                # A kept-alive connection the backend had just closed: try a fresh one.
        conn = await self._connect(origin)
        return await self._send(conn, head, body)

    async def _send(self, conn: _Connection, head: bytes, body: bytes) -> UpstreamResponse:
        conn.start()
        try:
            conn.transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                conn.transport.write(body)
            await conn.wait_head(self.idle_timeout)
        except BaseException:
            conn.close()
            raise
        return UpstreamResponse(self, conn, self.idle_timeout)

    def close_origin(self, base_url: str) -> None:
        """Drop the idle connections to one backend (it was removed)."""
        u = urlsplit(base_url)
        origin = (u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80))
        for c in self._idle.pop(origin, []):
            c.close()

    def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
