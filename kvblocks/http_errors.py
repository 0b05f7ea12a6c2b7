"""aiohttp serving whose HTTP-level errors answer OpenAI-style JSON like every other error.

aiohttp answers a request it cannot parse (oversized header, bad request line) itself, before any
middleware, with a text page that quotes the offending line - which may hold a credential. These
classes answer JSON instead (431 for oversized headers, 400 otherwise) and log one line without the
line's content. The proxy serves through them too. `json_response` and `bearer_token` are the one
JSON answer and the one `Authorization: Bearer` parser both servers use.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from kvblocks import error_body

log = logging.getLogger("kvroute.emulator.http")

_MESSAGES = {
    400: "malformed HTTP request",
    413: "request entity too large",
    414: "request line too long",
    431: "request header fields too large",
    500: "internal server error",
}


def json_response(data: object, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """`data` as an `application/json` response (orjson)."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), "" if none."""
    auth = headers.get("authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def protocol_error_status(status: int, exc: BaseException | None) -> int:
    """The status to answer a parser failure with: 431 for a header over the size limit."""
    if isinstance(exc, LineTooLong):
        return 414 if "status line" in str(exc).lower() else 431
    if isinstance(exc, BadHttpMessage) and "header" in str(exc).lower() and "too" in str(exc).lower():
        return 431
    return status


class _JSONErrorHandler(RequestHandler):
    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error response")
        status = protocol_error_status(status, exc)
        if status >= 500:
            log.error("error handling a request: %s", type(exc).__name__ if exc else "unknown")
        else:
            log.warning("rejected a malformed request (%d, %s)", status, type(exc).__name__ if exc else "unknown")
        msg = _MESSAGES.get(status, "bad request")
        resp = web.Response(body=orjson.dumps(error_body(status, msg)), status=status, content_type="application/json")
        resp.force_close()
        return resp


class _JSONErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JSONErrorHandler(self, loop=self._loop, **self._kwargs)


class JSONErrorAppRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer unparseable requests with error JSON."""

    async def _make_server(self) -> web.Server:
        s = await super()._make_server()
        return _JSONErrorServer(
            s.request_handler, request_factory=s.request_factory, handler_cancellation=s.handler_cancellation,
            loop=s._loop, **s._kwargs,
        )
