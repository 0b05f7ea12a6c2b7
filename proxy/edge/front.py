"""The proxy's front door: the two OpenAI POST routes served straight off the socket.

aiohttp's server machinery (request objects, middleware, response classes) is skipped for the hot
routes. `python -m benchmarks.proxy_bench edge` on the 2-core dev machine while other jobs loaded it (load
6-16): reading a request costs 6.7-8.0 us (first line, five runs); in two full runs the whole
proxy, routing included, used 0.88-1.15x the CPU per request of a bare aiohttp pass-through
relaying to the same 4 backends (non-streaming, 32 clients), 0.91-1.02x streaming.

The front reads every request head with llhttp (`httptools`, the parser of Node.js, uvicorn and
aiohttp's C extension), so malformed heads get a battle-tested parser's verdict: whatever llhttp
rejects, a missing or repeated Host, an over-long line or head is answered 4xx and the connection
closed, at once. It serves the common case itself - `POST /v1/completions` or
`/v1/chat/completions` over HTTP/1.1 with a Content-Length body within the limit - through the same
handler (a `RequestHandler`: `ProxyHandlers.serve`). Any other well-formed request (admin, metrics,
models, health, chunked or `Expect` bodies, duplicate key headers, HTTP/1.0) hands the connection to aiohttp with
the bytes buffered so far, between two requests. A client that disconnects cancels its request
(the upstream request is dropped with it). A head must arrive within `read_timeout`; a body may
take any time while it keeps arriving (no byte for `read_timeout`: 408).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import httptools
import orjson

from kvblocks import APIError, error_body

from ..http_fields import MAX_HEADERS, check_value, header_lines
from ..http_fields import status_line as _status_line
from ..upstream.sink import ResponseSink
from .handover import Guard
from .openai_request import ParsedRequest, parse_chat, parse_completion

log = logging.getLogger("kvroute.proxy")


class RequestHandler(Protocol):
    """What the front door needs of the handlers (`edge.handlers.ProxyHandlers`): one OpenAI request
    served into `sink`, answering its own errors (an `APIError` escapes only once the answer started)."""

    async def serve(
        self, path: str, parse: Callable[[bytes], ParsedRequest], headers: Mapping[str, str],
        read_body: Callable[[], Awaitable[bytes]], sink: ResponseSink,
    ) -> None: ...

ROUTES: dict[bytes, tuple[str, Callable[[bytes], ParsedRequest]]] = {
    b"/v1/completions": ("/v1/completions", parse_completion),
    b"/v1/chat/completions": ("/v1/chat/completions", parse_chat),
}
# The headers the proxy reads (a duplicate would be ambiguous: aiohttp decides those requests) and
# the ones that make a request aiohttp's to serve.
_READ = frozenset((b"content-length", b"authorization", b"x-request-id", b"x-kvroute-strategy"))
_HANDED_OVER = frozenset((b"transfer-encoding", b"expect", b"upgrade"))
# Idle keep-alive connections close after 75 s (nginx's and aiohttp's documented default), both the
# front's and, through its keepalive_timeout, aiohttp's: --client-keepalive-timeout.
KEEPALIVE_S = 75.0
SWEEP_S = 5.0
# After a rejection: how long, and how many bytes, the client's remaining input is read and dropped.
LINGER_S = 2.0
LINGER_BYTES = 1 << 20


def _head(status: int, headers: dict[str, str], content_type: str, extra: bytes) -> bytes:
    """A response head; every header value is checked (`UnsafeField`: nothing is written)."""
    return b"".join((
        _status_line(status), b"Content-Type: ", check_value(content_type).encode("latin-1", "replace"), b"\r\n",
        extra, header_lines(headers), b"\r\n",
    ))


class FrontSink:
    """Writes one answer on a front connection: whole (Content-Length) or streamed (chunked).

    A stream's head waits for its first chunk so both leave in one segment (one wakeup of the client)."""

    __slots__ = ("conn", "started", "close", "_head", "_sized")

    def __init__(self, conn: FrontProtocol, close: bool) -> None:
        self.conn = conn
        self.started = False
        self.close = close
        self._head = b""
        self._sized = False

    def _extra(self) -> bytes:
        return b"Connection: close\r\n" if self.close else b""

    async def send(self, status: int, headers: dict[str, str], body: bytes, content_type: str) -> None:
        head = _head(status, headers, content_type, b"Content-Length: %d\r\n" % len(body) + self._extra())
        self.started = True
        self.conn.write(head + body)

    async def start(self, status: int, headers: dict[str, str], content_type: str, charset: str | None,
                    length: int | None = None) -> None:
        ctype = f"{content_type}; charset={charset}" if charset else content_type
        framing = b"Transfer-Encoding: chunked\r\n" if length is None else b"Content-Length: %d\r\n" % length
        self._sized = length is not None
        self._head = _head(status, headers, ctype, framing + self._extra())
        self.started = True

    async def write(self, data: bytes) -> None:
        if data:
            conn = self.conn
            head, self._head = self._head, b""
            if self._sized:
                if head:
                    conn.write(head)
                conn.write(data)
            else:
                conn.write(b"%b%x\r\n%b\r\n" % (head, len(data), data))
            if conn._write_paused:  # no coroutine per chunk unless the client reads slowly
                await conn.drain()

    async def end(self) -> None:
        head, self._head = self._head, b""
        self.conn.write(head if self._sized else head + b"0\r\n\r\n")


class _Request:
    __slots__ = ("path", "parse", "headers", "head_len", "length", "close")

    def __init__(self, path: str, parse: Callable[[bytes], ParsedRequest], headers: dict[str, str], head_len: int,
                 length: int, close: bool):
        self.path = path
        self.parse = parse
        self.headers = headers
        self.head_len = head_len
        self.length = length
        self.close = close


class _Reject(Exception):
    """A request head the front answers with an error status and a closed connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _HeadReader:
    """llhttp's callbacks for one connection: the URL and the headers the proxy reads, per request.

    llhttp checks the syntax (tokens, CRLF line ends, no NUL/CR/LF in values, Content-Length digits,
    CL with TE, duplicate CL, obs-fold); this adds the proxy's limits and remembers what it needs."""

    __slots__ = ("parser", "max_line", "read", "url", "headers", "hosts", "fields", "dup", "other", "head_done",
                 "message_done")

    def __init__(self, max_line: int, read: frozenset[bytes] = _READ) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.max_line = max_line
        self.read = read
        self.reset()

    def reset(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.hosts = 0
        self.fields = 0
        self.dup = False  # a header the proxy reads, twice
        self.other = False  # a header that makes the request aiohttp's (chunked body, Expect, Upgrade)
        self.head_done = False
        self.message_done = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.max_line:
            raise _Reject(414, f"request line too long (limit {self.max_line} bytes)")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += 1
        if self.fields > MAX_HEADERS:
            raise _Reject(431, f"too many header fields (limit {MAX_HEADERS})")
        if len(name) + len(value) > self.max_line:
            raise _Reject(431, f"header field too long (limit {self.max_line} bytes)")
        key = name.lower()
        if key == b"host":
            self.hosts += 1
        elif key in self.read:
            if key in self.headers:
                self.dup = True
            self.headers[key] = value
        elif key in _HANDED_OVER:
            self.other = True

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_message_complete(self) -> None:
        self.message_done = True


class FrontProtocol(asyncio.Protocol):
    """One client connection; requests are served one at a time, in order (pipelined ones wait).

    Invariant: `buf` starts at the first byte of the next unserved request; llhttp has been fed
    `buf[:_fed]` of it (never a byte past its head until the front decided to serve it)."""

    def __init__(self, front: FrontServer) -> None:
        self.front = front
        self.loop = front.loop  # cached: asyncio.get_running_loop() costs a getpid() syscall on Python 3.11
        self.idle_since = self.last_read = self.loop.time()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.task: asyncio.Task | None = None
        self.lost = False
        self._write_paused = False
        self._read_paused = False
        self._drain: asyncio.Future | None = None
        self._heads = _HeadReader(front.max_line, front.read_headers)
        self._fed = 0
        self._head_started: float | None = None  # when the head being read began to arrive
        self._waiting: _Request | None = None  # a parsed head whose body is still arriving
        self._linger: asyncio.TimerHandle | None = None
        self._dropped = 0

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._linger is not None:
            self._linger.cancel()
        self.front.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left: drop its request (and the backend's)
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self.lost:  # rejected: lingering before the close
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        self.buf += data
        self.last_read = self.loop.time()
        if self.task is None:
            self._next()
        elif len(self.buf) > self.front.max_buffer and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # -- writing --------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.lost:
            raise ConnectionResetError("client disconnected")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self.lost:
            self._drain = self.loop.create_future()
            await self._drain
        if self.lost:
            raise ConnectionResetError("client disconnected")

    def _wake(self) -> None:
        w, self._drain = self._drain, None
        if w is not None and not w.done():
            w.set_result(None)

    # -- requests -------------------------------------------------------------------------------
    def _next(self) -> None:
        """With no request running: start the next buffered one, wait for more bytes, or hand over."""
        if self.lost or self.front.closing:
            return
        buf = self.buf
        req = self._waiting
        if req is None:
            if not buf:
                self.idle_since = self.loop.time()
                return
            if self._head_started is None:
                self._head_started = self.loop.time()
            try:
                req = self._read_head()
            except _Reject as e:
                self.reject(e.status, str(e))
                return
            if req is None:
                return
        total = req.head_len + req.length
        if len(buf) < total:
            self._waiting = req
            return
        self._waiting = None
        body = bytes(buf[req.head_len : total])
        heads = self._heads
        try:
            heads.parser.feed_data(body)
        except httptools.HttpParserError as e:  # cannot happen for a Content-Length body llhttp accepted
            self.reject(400, f"malformed request: {e}")
            return
        if not heads.message_done:
            self.reject(400, "malformed request: body framing")
            return
        heads.reset()
        self._fed = 0
        del buf[:total]
        self.task = self.loop.create_task(self._serve(req, body))

    def _read_head(self) -> _Request | None:
        """Feed llhttp the head's bytes (never past its end): the request when the front serves it,
        None when more bytes are needed or aiohttp took the connection; `_Reject` when it is malformed."""
        heads = self._heads
        buf = self.buf
        fed = self._fed
        max_head = self.front.max_head
        while not heads.head_done and fed < len(buf):
            end = buf.find(b"\r\n\r\n", max(fed - 3, 0))
            stop = len(buf) if end < 0 else end + 4
            if stop > max_head:
                raise _Reject(431, f"request head too large (limit {max_head} bytes)")
            try:
                heads.parser.feed_data(buf[fed:stop])
            except httptools.HttpParserCallbackError as e:
                if isinstance(e.__context__, _Reject):
                    raise e.__context__ from None
                raise _Reject(400, f"malformed request: {e}") from None
            except httptools.HttpParserUpgrade:
                self._fed = stop
                self._hand_over()
                return None
            except httptools.HttpParserError as e:
                raise _Reject(400, f"malformed request: {e}") from None
            fed = stop
        self._fed = fed
        if not heads.head_done:
            return None
        self._head_started = None
        p = heads.parser
        version = p.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _Reject(505, f"HTTP/{version} is not supported")
        if heads.hosts > 1 or (heads.hosts == 0 and version == "1.1"):
            raise _Reject(400, "an HTTP/1.1 request needs exactly one Host header")
        route = ROUTES.get(heads.url)
        cl = heads.headers.get(b"content-length")
        if (route is None or version != "1.1" or heads.other or heads.dup or cl is None
                or p.get_method() != b"POST" or int(cl) > self.front.max_body):
            self._hand_over()
            return None
        headers = {k.decode(): v.decode("utf-8", "surrogateescape") for k, v in heads.headers.items() if k != b"content-length"}
        return _Request(route[0], route[1], headers, fed, int(cl), not p.should_keep_alive())

    def reject(self, status: int, message: str) -> None:
        """Answer a malformed or late request with an OpenAI-style error, then close (llhttp's state is lost).

        The close lingers: our side is shut for writing and what the client still sends is read and
        dropped (up to LINGER_BYTES, for LINGER_S), since closing with unread bytes would reset the
        connection and the client, still sending its body, might never read the answer."""
        log.debug("front: %d %s", status, message)
        if self.front.on_reject is not None:
            with contextlib.suppress(Exception):
                self.front.on_reject(status)
        body = orjson.dumps(error_body(status, message))
        transport = self.transport
        if not self.lost and transport is not None and not transport.is_closing():
            transport.write(
                _status_line(status) + b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % len(body) + body
            )
            if self._read_paused:
                self._read_paused = False
                transport.resume_reading()
            if transport.can_write_eof():
                transport.write_eof()
                self._linger = self.loop.call_later(LINGER_S, transport.close)
            else:
                transport.close()
        self.lost = True
        self._dropped = 0
        self.buf.clear()

    def check_timeouts(self, now: float) -> None:
        """Called by the sweep when no request runs: a slow head, a stalled body or a long idle ends it."""
        front = self.front
        if self._head_started is not None and now - self._head_started > front.read_timeout:
            self.reject(408, f"request head not received within {front.read_timeout:g} s")
        elif self._waiting is not None:
            if now - self.last_read > front.read_timeout:
                self.reject(408, f"request body stalled: no byte for {front.read_timeout:g} s")
        elif not self.buf and now - self.idle_since > front.keepalive_s and self.transport is not None:
            self.transport.close()

    async def _serve(self, req: _Request, body: bytes) -> None:
        sink = FrontSink(self, req.close or self.front.closing)
        front = self.front

        async def read_body() -> bytes:
            return body

        try:
            try:
                await front.handler.serve(req.path, req.parse, req.headers, read_body, sink)
            except APIError:  # only once the answer had started: the connection cannot carry another
                sink.close = True
            except (ConnectionResetError, asyncio.CancelledError):
                raise
            except Exception:
                log.exception("unhandled error on POST %s", req.path)
                if not sink.started:
                    await sink.send(500, {}, orjson.dumps(error_body(500, "internal proxy error")), "application/json")
                sink.close = True
        except ConnectionResetError:
            sink.close = True
        except asyncio.CancelledError:
            sink.close = True
            if not self.lost:
                raise
        finally:
            self.task = None
            if sink.close or self.front.closing:
                if not self.lost:
                    self.transport.close()
            else:
                if self._read_paused:
                    self._read_paused = False
                    self.transport.resume_reading()
                self._next()

    def _hand_over(self) -> None:
        """From here on aiohttp serves this connection, starting with the bytes buffered so far
        (the whole of the request llhttp just read: `buf` starts at its first byte), behind a `Guard`
        that keeps the front's limits on it."""
        self.front.connections.discard(self)
        proto = Guard(self.front, self.front.aiohttp_protocol())
        transport = self.transport
        transport.set_protocol(proto)
        proto.connection_made(transport)
        data, self.buf = bytes(self.buf), bytearray()
        if self._read_paused:
            transport.resume_reading()
        if data:
            proto.data_received(data)


class FrontServer:
    """The listening socket and its connections; `aiohttp_protocol` makes aiohttp's handler for a handover.

    `handler` serves the requests the front parsed; `on_reject(status)` is told of every request the
    front itself refused (malformed, too large, too slow), e.g. to count it."""

    def __init__(
        self, handler: RequestHandler, aiohttp_protocol: Callable[[], asyncio.Protocol], max_body: int, max_line: int,
        read_timeout: float = 60.0, on_reject: Callable[[int], None] | None = None, keepalive_s: float = KEEPALIVE_S,
        session_header: str = "",
    ) -> None:
        self.handler = handler
        self.on_reject = on_reject
        self.aiohttp_protocol = aiohttp_protocol
        self.max_body = max_body
        self.max_line = max_line
        self.max_head = 64 * 1024
        self.max_buffer = max_body + self.max_head
        self.read_timeout = read_timeout
        self.keepalive_s = keepalive_s
        # ... and the session header (routing/session.py), whatever it is configured to be
        self.read_headers = _READ | {session_header.lower().encode("latin-1")} if session_header else _READ
        self.linger_s = LINGER_S
        self.linger_bytes = LINGER_BYTES
        self.guarded: set[Guard] = set()  # connections handed to aiohttp, still under the front's limits
        self.sweep_s = min(SWEEP_S, read_timeout / 2)
        self.connections: set[FrontProtocol] = set()
        self.closing = False
        self.server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sweep: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int, backlog: int, reuse_port: bool = False) -> list[tuple[str, int]]:
        self.loop = loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: FrontProtocol(self), host, port, reuse_address=True, backlog=backlog,
                                               reuse_port=reuse_port or None)
        self._sweep = loop.call_later(self.sweep_s, self._check_connections)
        return [s.getsockname()[:2] for s in self.server.sockets]

    def _check_connections(self) -> None:
        """Timeouts of connections between requests (one timer for all, not one per request)."""
        now = self.loop.time()
        for c in list(self.connections):
            if c.task is None and not c.lost:
                c.check_timeouts(now)
        for g in list(self.guarded):
            g.check_timeouts(now)
        self._sweep = self.loop.call_later(self.sweep_s, self._check_connections)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, close idle connections, give running requests `grace` seconds, then close."""
        self.closing = True
        if self._sweep is not None:
            self._sweep.cancel()
        if self.server is not None:
            self.server.close()
        for c in list(self.connections):
            if c.task is None and c.transport is not None:
                c.transport.close()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace + 1.0)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
