"""Where a proxied answer goes: the one small interface the forwarder writes to.

The forwarder only sends a whole answer, or starts a stream, writes chunks and ends it; it never
touches the HTTP server behind. The consumer owns the interface; its implementations live at the
edge: `edge.handlers.AiohttpSink` serves requests aiohttp parsed (admin clients, odd requests, the
test client), `edge.front.FrontSink` the ones the fast front door parsed itself.
"""
from __future__ import annotations

from typing import Protocol


class ResponseSink(Protocol):
    started: bool  # whether the answer has begun (nothing else can be sent then)

    async def send(self, status: int, headers: dict[str, str], body: bytes, content_type: str) -> None:
        """The whole answer at once (Content-Length)."""

    async def start(self, status: int, headers: dict[str, str], content_type: str, charset: str | None,
                    length: int | None = None) -> None:
        """Begin a streamed answer; `write` chunks follow, then `end`. With `length`: a Content-Length
        answer relayed in pieces (exactly `length` bytes follow), else chunked."""

    async def write(self, data: bytes) -> None: ...

    async def end(self) -> None: ...
