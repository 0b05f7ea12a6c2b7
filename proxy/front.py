"""The proxy's front door: the two OpenAI POST routes served straight off the socket.

aiohttp's server costs more CPU per proxied request than routing it does (~190 us against ~50 us
for a 1,000-token prompt here). The front parses the common case itself - `POST /v1/completions` or
`/v1/chat/completions` over HTTP/1.1 with a Content-Length body within the limit - and answers it
through the same handlers (`ProxyHandlers.serve`). Anything else (admin, metrics, models, health,
chunked or `Expect` bodies, long or odd heads, duplicate key headers, HTTP/1.0) hands the connection
to aiohttp with the bytes buffered so far, between two requests, so every edge case keeps aiohttp's
behaviour. A client that disconnects cancels its request (the upstream request is dropped with it).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

import orjson

from kvblocks import APIError, error_body

from .openai_request import ParsedRequest, parse_chat, parse_completion

if TYPE_CHECKING:
    from .server import ProxyHandlers

log = logging.getLogger("kvroute.proxy")

ROUTES: dict[bytes, tuple[str, Callable[[bytes], ParsedRequest]]] = {
    b"/v1/completions": ("/v1/completions", parse_completion),
    b"/v1/chat/completions": ("/v1/chat/completions", parse_chat),
}
# The headers the proxy reads (a duplicate would be ambiguous: aiohttp decides those requests) and
# the ones that make a request aiohttp's to serve.
_READ = frozenset((b"content-length", b"connection", b"authorization", b"x-request-id", b"x-kvroute-strategy"))
_HANDED_OVER = frozenset((b"transfer-encoding", b"expect", b"upgrade"))
_DIGITS = frozenset(b"0123456789")
# aiohttp's default limit on header lines; a request over it is aiohttp's to reject.
MAX_HEADERS = 128
# aiohttp closes idle keep-alive connections after 75 s; so does the front.
KEEPALIVE_S = 75.0
SWEEP_S = 5.0
_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
    return line


def _head(status: int, headers: dict[str, str], content_type: str, extra: bytes) -> bytes:
    out = [_status_line(status), b"Content-Type: ", content_type.encode("latin-1"), b"\r\n", extra]
    for k, v in headers.items():
        out.append(f"{k}: {v}\r\n".encode("latin-1", "replace"))
    out.append(b"\r\n")
    return b"".join(out)


class FrontSink:
    """Writes one answer on a front connection: whole (Content-Length) or streamed (chunked).

    A stream's head waits for its first chunk so both leave in one segment (one wakeup of the client)."""

    __slots__ = ("conn", "started", "close", "_head")

    def __init__(self, conn: FrontProtocol, close: bool) -> None:
        self.conn = conn
        self.started = False
        self.close = close
        self._head = b""

    def _extra(self) -> bytes:
        return b"Connection: close\r\n" if self.close else b""

    async def send(self, status: int, headers: dict[str, str], body: bytes, content_type: str) -> None:
        self.started = True
        length = b"Content-Length: %d\r\n" % len(body) + self._extra()
        self.conn.write(_head(status, headers, content_type, length) + body)

    async def start(self, status: int, headers: dict[str, str], content_type: str, charset: str | None) -> None:
        self.started = True
        ctype = f"{content_type}; charset={charset}" if charset else content_type
        self._head = _head(status, headers, ctype, b"Transfer-Encoding: chunked\r\n" + self._extra())

    async def write(self, data: bytes) -> None:
        if data:
            conn = self.conn
            head, self._head = self._head, b""
            conn.write(b"%b%x\r\n%b\r\n" % (head, len(data), data))
            if conn._write_paused:  # no coroutine per chunk unless the client reads slowly
                await conn.drain()

    async def end(self) -> None:
        head, self._head = self._head, b""
        self.conn.write(head + b"0\r\n\r\n")


class _Request:
    __slots__ = ("path", "parse", "headers", "length", "close")

    def __init__(self, path: str, parse: Callable[[bytes], ParsedRequest], headers: dict[str, str], length: int, close: bool):
        self.path = path
        self.parse = parse
        self.headers = headers
        self.length = length
        self.close = close


class FrontProtocol(asyncio.Protocol):
    """One client connection; requests are served one at a time, in order (pipelined ones wait)."""

    def __init__(self, front: FrontServer) -> None:
        self.front = front
        self.loop = front.loop  # cached: asyncio.get_running_loop() costs a getpid() syscall on Python 3.11
        self.idle_since = self.loop.time()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.task: asyncio.Task | None = None
        self.lost = False
        self._write_paused = False
        self._read_paused = False
        self._drain: asyncio.Future | None = None
        self._waiting: tuple[_Request, int] | None = None  # a parsed head whose body is still arriving

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
        self.front.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client left: drop its request (and the backend's)
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.buf += data
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
        if not buf:
            self.idle_since = self.loop.time()
            return
        if self._waiting is not None:  # the head arrived before its body: not parsed again
            req, end = self._waiting
        else:
            front = self.front
            end = buf.find(b"\r\n\r\n", 0, front.max_head + 4)
            if end < 0:
                if len(buf) > front.max_head:
                    self._hand_over()
                return
            req = self._parse(bytes(buf[:end]))
            if req is None:
                self._hand_over()
                return
        total = end + 4 + req.length
        if len(buf) < total:
            self._waiting = (req, end)
            return
        self._waiting = None
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        self.task = self.loop.create_task(self._serve(req, body))

    def _parse(self, head: bytes) -> _Request | None:
        """The request head when the front serves it itself, else None (aiohttp will)."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
            return None
        route = ROUTES.get(parts[1])
        if route is None:
            return None
        max_line = self.front.max_line
        if len(lines) > MAX_HEADERS:
            return None
        seen: set[bytes] = set()
        headers: dict[str, str] = {}
        cl = b""
        close = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or len(line) > max_line or name[-1:] in b" \t" or name[:1] in b" \t":
                return None
            key = name.lower()
            if key in _HANDED_OVER:
                return None
            if key in _READ:
                if key in seen:
                    return None
                seen.add(key)
                value = value.strip(b" \t")
                if key == b"content-length":
                    cl = value
                elif key == b"connection":
                    close = b"close" in value.lower()
                else:
                    headers[key.decode()] = value.decode("utf-8", "surrogateescape")
        if not cl or not _DIGITS.issuperset(cl):
            return None
        length = int(cl)
        if length > self.front.max_body:
            return None
        return _Request(route[0], route[1], headers, length, close)

    async def _serve(self, req: _Request, body: bytes) -> None:
        sink = FrontSink(self, req.close or self.front.closing)
        front = self.front

        async def read_body() -> bytes:
            return body

        try:
            try:
                await front.handlers.serve(req.path, req.parse, req.headers, read_body, sink)
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
        """From here on aiohttp serves this connection, starting with the bytes buffered so far."""
        self.front.connections.discard(self)
        proto = self.front.aiohttp_protocol()
        transport = self.transport
        transport.set_protocol(proto)
        proto.connection_made(transport)
        data, self.buf = bytes(self.buf), bytearray()
        if self._read_paused:
            transport.resume_reading()
        if data:
            proto.data_received(data)


class FrontServer:
    """The listening socket and its connections; `aiohttp_protocol` makes aiohttp's handler for a handover."""

    def __init__(
        self, handlers: ProxyHandlers, aiohttp_protocol: Callable[[], asyncio.Protocol], max_body: int, max_line: int,
    ) -> None:
        self.handlers = handlers
        self.aiohttp_protocol = aiohttp_protocol
        self.max_body = max_body
        self.max_line = max_line
        self.max_head = 64 * 1024
        self.max_buffer = max_body + self.max_head
        self.connections: set[FrontProtocol] = set()
        self.closing = False
        self.server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sweep: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int, backlog: int) -> list[tuple[str, int]]:
        self.loop = loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: FrontProtocol(self), host, port, reuse_address=True, backlog=backlog)
        self._sweep = loop.call_later(SWEEP_S, self._close_idle)
        return [s.getsockname()[:2] for s in self.server.sockets]

    def _close_idle(self) -> None:
        """Close keep-alive connections idle for KEEPALIVE_S (one timer for all, not one per request)."""
        cutoff = self.loop.time() - KEEPALIVE_S
        for c in list(self.connections):
            if c.task is None and c.idle_since < cutoff and c.transport is not None:
                c.transport.close()
        self._sweep = self.loop.call_later(SWEEP_S, self._close_idle)

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
