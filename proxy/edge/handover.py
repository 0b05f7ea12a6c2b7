"""The front door's limits on connections it hands to aiohttp: one set of rules on every route.

The front (`front.py`) serves the two hot routes itself and hands any other request's connection to
aiohttp, which has no head timeout, no body-progress timeout, a 100-continue sent before the body
limit is checked and a text/plain 417. So the hand-over does not give the socket away: `Guard` sits
between the transport and aiohttp's protocol for the connection's life, follows every request with
llhttp (as the front does) and applies the front's rules before aiohttp sees a byte:
- a head must arrive within `read_timeout` of its first byte (408), a body may pause at most
  `read_timeout` (408), Content-Length or chunked alike;
- request line / field length, header count and head size bounds (414/431);
- a declared or counted body over `max_body` is a 413 before any `100 Continue` is sent;
  an `Expect` other than `100-continue` is a 417; all of these as OpenAI-style JSON, then a close.
The idle keep-alive between requests is aiohttp's `keepalive_timeout`, set to the front's value.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import httptools
import orjson

from kvblocks import error_body

from ..http_fields import MAX_HEADERS, status_line

log = logging.getLogger("kvroute.proxy")


class Limits(Protocol):
    """What a guard reads of the server that handed it the connection (the front door, `FrontServer`):
    the same bounds and timeouts, its loop, the set of guarded connections and whom to tell of a reject."""

    loop: asyncio.AbstractEventLoop
    max_line: int
    max_head: int
    max_body: int
    read_timeout: float
    linger_s: float
    linger_bytes: int
    guarded: set[Guard]
    on_reject: Callable[[int], None] | None

_IDLE, _HEAD, _BODY, _UNTRACKED = range(4)


class _Limit(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Guard(asyncio.Protocol):
    """The transport's protocol after a hand-over: checks, then passes every byte and event to `inner`.

    Invariant: `inner` receives only bytes the tracker has accepted; after a rejection, none."""

    def __init__(self, front: Limits, inner: asyncio.Protocol) -> None:
        self.front = front
        self.inner = inner
        self.loop = front.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.state = _IDLE
        self.rejected = False
        self.head_started = 0.0
        self.last_read = self.loop.time()
        self._url = 0
        self._fields = 0
        self._head_bytes = 0
        self._body_bytes = 0
        self._length: int | None = None
        self._expect: bytes | None = None
        self._dropped = 0
        self._drop_budget = front.linger_bytes

    # -- llhttp callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.state = _HEAD
        self.head_started = self.loop.time()
        self._url = self._fields = self._head_bytes = self._body_bytes = 0
        self._length = self._expect = None

    def on_url(self, url: bytes) -> None:
        self._url += len(url)
        if self._url > self.front.max_line:
            raise _Limit(414, f"request line too long (limit {self.front.max_line} bytes)")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > MAX_HEADERS:
            raise _Limit(431, f"too many header fields (limit {MAX_HEADERS})")
        if len(name) + len(value) > self.front.max_line:
            raise _Limit(431, f"header field too long (limit {self.front.max_line} bytes)")
        key = name.lower()
        if key == b"content-length" and value.strip().isdigit() and len(value) < 20:
            self._length = int(value)
        elif key == b"expect":
            self._expect = value.strip().lower()

    def on_headers_complete(self) -> None:
        self.state = _BODY
        limit = self.front.max_body
        if self._length is not None and self._length > limit:  # before aiohttp could send 100 Continue
            raise _Limit(413, f"request body too large (limit {limit} bytes)")
        if self._expect is not None and self._expect != b"100-continue":
            raise _Limit(417, "the only expectation supported is Expect: 100-continue")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.front.max_body:
            raise _Limit(413, f"request body too large (limit {self.front.max_body} bytes)")

    def on_message_complete(self) -> None:
        self.state = _IDLE

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.front.guarded.add(self)
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.guarded.discard(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def eof_received(self) -> bool | None:
        if self.rejected:
            return False
        return self.inner.eof_received()

    def data_received(self, data: bytes) -> None:
        if self.rejected:  # lingering before the close: drop what the client still sends
            self._dropped += len(data)
            if self._dropped > self._drop_budget and self.transport is not None:
                self.transport.close()
            return
        self.last_read = self.loop.time()
        if self.state != _UNTRACKED:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserCallbackError as e:
                ctx = e.__context__
                if isinstance(ctx, _Limit):
                    self.reject(ctx.status, str(ctx))
                    return
                self.reject(400, f"malformed request: {e}")
                return
            except httptools.HttpParserUpgrade:
                self.state = _UNTRACKED  # the proxy serves no upgrade; aiohttp answers it and closes
            except httptools.HttpParserError as e:
                self.reject(400, f"malformed request: {e}")
                return
            if self.state == _HEAD:
                self._head_bytes += len(data)
                if self._head_bytes > self.front.max_head:
                    self.reject(431, f"request head too large (limit {self.front.max_head} bytes)")
                    return
        self.inner.data_received(data)

    # -- the rules --------------------------------------------------------------------------------
    def check_timeouts(self, now: float) -> None:
        """Called by the front's sweep: a head late since its first byte, or a body silent too long, ends it."""
        if self.rejected or self.transport is None or self.transport.is_closing():
            return
        timeout = self.front.read_timeout
        if self.state == _HEAD and now - self.head_started > timeout:
            self.reject(408, f"request head not received within {timeout:g} s")
        elif self.state == _BODY:
            if not self.transport.is_reading():  # aiohttp paused reading: the wait is ours, not the client's
                self.last_read = now
            elif now - self.last_read > timeout:
                self.reject(408, f"request body stalled: no byte for {timeout:g} s")

    def reject(self, status: int, message: str) -> None:
        """The front's answer to a bad or late request (OpenAI-style JSON, Connection: close, a lingering
        close); aiohttp gets no more bytes and is told the connection is lost at once, which cancels
        whatever it was doing for it (its handler, its admission slot, its buffered body)."""
        log.debug("handover: %d %s", status, message)
        self.rejected = True
        if status == 413:  # a client already sending its whole body still gets to read the answer
            self._drop_budget += self.front.max_body
        if self.front.on_reject is not None:
            with contextlib.suppress(Exception):
                self.front.on_reject(status)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = orjson.dumps(error_body(status, message))
        transport.write(status_line(status) + b"Content-Type: application/json\r\nContent-Length: %d\r\n"
                        b"Connection: close\r\n\r\n" % len(body) + body)
        if not transport.is_reading():
            transport.resume_reading()
        self._release_inner()
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(self.front.linger_s, transport.close)
        else:
            transport.close()

    def _release_inner(self) -> None:
        """aiohttp's `connection_lost` without its closing the socket (which would reset it before the
        client read the answer): it is detached from the transport first; the linger closes it later."""
        inner, self.inner = self.inner, asyncio.Protocol()
        with contextlib.suppress(AttributeError):
            inner.transport = None  # type: ignore[attr-defined]
        try:
            inner.connection_lost(None)
        except Exception:  # noqa: BLE001 - aiohttp's teardown must not break the answer already written
            log.debug("handover: aiohttp teardown failed", exc_info=True)
