"""vLLM's utility routes, passed through to a backend serving the requested model.

Clients such as `vllm bench serve` and SDK helpers call `/tokenize`, `/detokenize` and `/version` (and
the pooling routes) on whatever they think is a vLLM server; the proxy must answer them as one. They
carry no prefix worth routing on, so the least-busy healthy backend that serves the body's `model`
answers; its status and body come back unchanged, with the proxy's credentials for it upstream.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp
import orjson
from aiohttp import web

from kvblocks import APIError, error_body

from ..backends.registry import Backend
from ..upstream.health import note_auth

if TYPE_CHECKING:
    from .handlers import ProxyHandlers

log = logging.getLogger("kvroute.proxy")

POST_ROUTES = (
    "/tokenize", "/detokenize", "/v1/embeddings", "/pooling", "/classify", "/score", "/v1/score",
    "/rerank", "/v1/rerank", "/v2/rerank",
)
GET_ROUTES = ("/version",)


class Passthrough:
    """Answers the routes above through one healthy backend; thin over `ProxyHandlers`' session and its
    public checks (API key, body, model, request id). A non-streamed answer is bounded by --max-response-bytes."""

    def __init__(self, handlers: ProxyHandlers) -> None:
        self.h = handlers

    def pick(self, model: str | None) -> Backend:
        serving = [b for b in self.h.router.registry.healthy() if b.serves(model)]
        if not serving:
            raise APIError(503, "no healthy backend serves this model" if model else "no healthy backend available")
        return min(serving, key=lambda b: b.in_flight)

    async def handle(self, request: web.Request) -> web.Response:
        h = self.h
        h.check_api_key(request.headers)
        model = None
        body = b""
        if request.method == "POST":
            body = await h.read_body(request)
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise APIError(400, f"request body is not valid JSON: {e}") from None
            if isinstance(data, dict):
                model = data.get("model")
                if model is not None and not isinstance(model, str):
                    raise APIError(400, "model must be a string", "model")
        if model is not None:
            h.check_model_name(model)
        b = self.pick(model)
        headers = {"X-Request-ID": h.request_id(request.headers), **b.auth_headers}
        if request.method == "POST":
            headers["Content-Type"] = "application/json"
        limit = h.config.max_response_bytes  # read whole (small JSON), never without bound
        timeout = aiohttp.ClientTimeout(total=h.config.first_byte_timeout, sock_connect=h.config.connect_timeout)
        try:
            async with h.context.session.request(request.method, b.url + request.path, data=body or None,
                                                 headers=headers, timeout=timeout, allow_redirects=False) as r:
                payload = await r.content.read(limit + 1)
                status, content_type = r.status, r.content_type
        except asyncio.TimeoutError:
            raise APIError(504, f"backend timed out on {request.path}") from None
        except (aiohttp.ClientError, OSError) as e:
            raise APIError(502, f"backend failed on {request.path} ({type(e).__name__})") from None
        if len(payload) > limit:
            raise APIError(502, f"backend answer to {request.path} exceeds {limit} bytes")
        note_auth(b, status)
        if b.auth_error and status in (401, 403):
            return web.Response(status=502, body=orjson.dumps(error_body(502, f"backend {b.url}: {b.auth_error}")),
                                content_type="application/json", headers={"x-kvroute-backend": b.url})
        return web.Response(status=status, body=payload, content_type=content_type or "application/json",
                            headers={"x-kvroute-backend": b.url})


def add_passthrough_routes(app: web.Application, handlers: ProxyHandlers) -> None:
    p = Passthrough(handlers)
    for path in POST_ROUTES:
        app.router.add_post(path, p.handle)
    for path in GET_ROUTES:
        app.router.add_get(path, p.handle)
