"""A small keep-alive HTTP/1.1 client for the hot path: POST a JSON body, stream the answer back.

Forwarding uses this rather than aiohttp's client (health checks, scrapes and admin calls still use
aiohttp): answers are parsed by llhttp (`httptools`) inside a plain asyncio protocol, 2.8-4.3 us
per small answer and 0.4-0.8 us per SSE chunk (`python -m benchmarks.proxy_bench edge`, first line, five runs).
It speaks what a vLLM-compatible backend answers: a Content-Length body, chunked transfer encoding,
or a body up to EOF; hands body bytes to the caller as they arrive (chunked framing removed), pauses
reading when the caller falls behind, and closes the connection when a response is abandoned, so
the backend sees the disconnect and aborts the request. A malformed or oversized answer is never
relayed.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as ssl_mod
from collections import deque
from collections.abc import Awaitable
from urllib.parse import urlsplit

import httptools

from ..http_fields import UnsafeField, check_value, header_lines

MAX_HEAD_BYTES = 64 * 1024  # bound on a head, and on the framing and trailers between two body bytes
MAX_BODY_BYTES = 64 * 1024 * 1024  # default bound on a buffered (non-streamed) body, and on any one chunk
HIGH_WATER = 1 << 20

_HEAD, _BODY, _DONE = range(3)


class UpstreamError(Exception):
    """The backend broke the HTTP exchange (closed, reset, malformed answer)."""


class UpstreamProtocolError(UpstreamError):
    """The backend's answer broke HTTP framing or a bound: llhttp rejected it, a status outside
    100-599, an unsafe Content-Type, an oversized head, trailers, chunk or body."""


class UpstreamTimeout(TimeoutError):
    """The backend was silent for longer than the idle timeout."""


class _AfterAnswer(Exception):
    """Bytes after a complete answer: the connection is not reused."""


class _Connection(asyncio.Protocol):
    """One TCP connection; llhttp (`httptools`) parses one response at a time.

    llhttp enforces the syntax (status line, tokens, CRLF line ends, digits-only Content-Length,
    hex-only chunk sizes without overflow, CL with TE); the callbacks add the bounds and the status
    range. Any violation fails the exchange with `UpstreamProtocolError` and aborts the connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_body: int = MAX_BODY_BYTES) -> None:
        self.loop = loop
        self.max_body = max_body
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.exc: BaseException | None = None
        self._state = _DONE
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future | None = None
        self._wait_started = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._overhead = 0  # bytes received since the last body byte (head, chunk framing, trailers)
        self._body_seen = False
        self._chunk = 0  # bytes of the current chunk (or Content-Length body) so far
        self._until_eof = False
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
        if self._state == _BODY and self._until_eof:
            self._state = _DONE
        elif self._state != _DONE and self.exc is None:
            self.exc = UpstreamError(f"backend closed the connection{': ' + str(exc) if exc else ''}")
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self._state == _DONE:  # bytes after a complete answer, or before any request: not reusable
            self.keep_alive = False
            self.close()
            return
        self._body_seen = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            ctx = e.__context__
            if isinstance(ctx, _AfterAnswer):
                self.keep_alive = False
            else:
                self._fail(ctx if isinstance(ctx, UpstreamError) else UpstreamProtocolError(f"malformed response: {e}"))
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("malformed response: unexpected protocol upgrade"))
        except httptools.HttpParserError as e:
            self._fail(UpstreamProtocolError(f"malformed response: {e}"))
        else:
            if self._body_seen:
                self._overhead = 0
            elif self._state != _DONE:
                self._overhead += len(data)
                if self._overhead > MAX_HEAD_BYTES:
                    self._fail(UpstreamProtocolError(f"response head or trailers over {MAX_HEAD_BYTES} bytes"))
        self._wake()

    def eof_received(self) -> bool:
        return False

    def _fail(self, exc: UpstreamError) -> None:
        self.exc = exc
        self.close()

    # -- llhttp callbacks -----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._state == _DONE:
            raise _AfterAnswer

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state == _HEAD:  # trailers are parsed (and bounded) but not kept
            self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            raise UpstreamProtocolError(f"malformed response: status {status} outside 100-599")
        if status < 200:
            if status == 101:
                raise UpstreamProtocolError("malformed response: unexpected 101 Switching Protocols")
            self.headers = {}  # informational: the real answer follows
            return
        h = self.headers
        ctype = h.get("content-type")
        if ctype is not None:
            try:
                check_value(ctype)
            except UnsafeField as e:
                raise UpstreamProtocolError(f"malformed response: {e}") from None
        self._until_eof = ("content-length" not in h and "chunked" not in h.get("transfer-encoding", "").lower()
                           and status not in (204, 304))
        if self._until_eof:
            self.keep_alive = False
        self.status = status
        self._state = _BODY

    def on_chunk_header(self) -> None:
        self._chunk = 0

    def on_body(self, body: bytes) -> None:
        self._body_seen = True
        self._chunk += len(body)
        if self._chunk > self.max_body:
            raise UpstreamProtocolError(f"response chunk over {self.max_body} bytes")
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.status == 0:  # the end of an informational (1xx) answer
            return
        self._state = _DONE
        if not self.parser.should_keep_alive():
            self.keep_alive = False

    def start(self) -> None:
        self._state = _HEAD
        self._chunks.clear()
        self._buffered = 0
        self._overhead = 0
        self._chunk = 0
        self._until_eof = False
        self.got_bytes = False
        self.exc = None
        self.status = 0
        self.headers = {}

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

    def __init__(self, pool: UpstreamPool, conn: _Connection, idle_timeout: float | None, base_url: str = "") -> None:
        self._pool = pool
        self.base_url = base_url  # the backend, as the caller named it
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

    async def read_some(self, want: int) -> tuple[bytes, bool]:
        """At least `want` bytes of the body, or all of it: (bytes, whether that is the whole body).
        A declared Content-Length over the pool's `max_body` is refused before anything is read."""
        declared = self.headers.get("content-length")
        if declared is not None and int(declared) > self._pool.max_body:
            raise UpstreamProtocolError(f"response body of {int(declared)} bytes over the {self._pool.max_body}-byte limit")
        parts = []
        size = 0
        while size < want:
            chunk = await self._conn.read_chunk(self._idle)
            if not chunk:
                return b"".join(parts), True
            size += len(chunk)
            parts.append(chunk)
        return b"".join(parts), False

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body, at most `limit` (default: the pool's `max_body`) bytes (`UpstreamProtocolError` beyond)."""
        limit = self._pool.max_body if limit is None else min(limit, self._pool.max_body)
        declared = self.headers.get("content-length")
        if declared is not None and int(declared) > limit:
            raise UpstreamProtocolError(f"response body of {int(declared)} bytes over the {limit}-byte limit")
        parts = []
        size = 0
        while True:
            chunk = await self._conn.read_chunk(self._idle)
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                raise UpstreamProtocolError(f"response body over the {limit}-byte limit")
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

    def __init__(
        self, connect_timeout: float, idle_timeout: float | None, max_idle_per_origin: int = 256,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.max_body = max_body
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
            _, conn = await loop.create_connection(lambda: _Connection(loop, self.max_body), host, port, ssl=ssl_ctx)
        conn.origin = origin  # type: ignore[attr-defined]
        return conn

    async def post(self, base_url: str, path: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """Send the request and wait for the response head (the caller bounds the wait)."""
        origin, line = self._origin(base_url, path)
        head = line + header_lines(headers)
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            try:
                return await self._send(conn, head, body, base_url)
            except UpstreamError:
                if conn.got_bytes:
                    raise
                # A kept-alive connection the backend had just closed: try a fresh one.
        conn = await self._connect(origin)
        return await self._send(conn, head, body, base_url)

    async def _send(self, conn: _Connection, head: bytes, body: bytes, base_url: str) -> UpstreamResponse:
        conn.start()
        try:
            conn.transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                conn.transport.write(body)
            await conn.wait_head(self.idle_timeout)
        except BaseException:
            conn.close()
            raise
        return UpstreamResponse(self, conn, self.idle_timeout, base_url)

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
