"""Where a proxied answer goes: one small interface over aiohttp's responses and the front's socket.

The forwarder only sends a whole answer, or starts a stream, writes chunks and ends it; it never
touches the HTTP server behind. `AiohttpSink` serves requests aiohttp parsed (admin clients, odd
requests, the test client), `front.FrontSink` the ones the fast front door parsed itself.
"""
from __future__ import annotations

from typing import Protocol

from aiohttp import web


class ResponseSink(Protocol):
    started: bool  # whether the answer has begun (nothing else can be sent then)

    async def send(self, status: int, headers: dict[str, str], body: bytes, content_type: str) -> None:
        """The whole answer at once (Content-Length)."""

    async def start(self, status: int, headers: dict[str, str], content_type: str, charset: str | None) -> None:
        """Begin a streamed answer; `write` chunks follow, then `end`."""

    async def write(self, data: bytes) -> None: ...

    async def end(self) -> None: ...


class AiohttpSink:
    """Builds the aiohttp response the handler returns (`response`); streams are prepared on `start`."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    @property
    def started(self) -> bool:
        return self.response is not None

    async def send(self, status: int, headers: dict[str, str], body: bytes, content_type: str) -> None:
        self.response = web.Response(body=body, status=status, headers=headers, content_type=content_type)

    async def start(self, status: int, headers: dict[str, str], content_type: str, charset: str | None) -> None:
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = content_type
        if charset:
            resp.charset = charset
        await resp.prepare(self.request)
        self.response = resp

    async def write(self, data: bytes) -> None:
        await self.response.write(data)  # type: ignore[union-attr]

    async def end(self) -> None:
        await self.response.write_eof()  # type: ignore[union-attr]
