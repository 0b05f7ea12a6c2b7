"""The OpenAI-facing handlers: thin over `Router` (which backend) and `Forwarder` (send it there).

`ProxyHandlers.serve` is the one path of an OpenAI request, whichever server parsed it (the front
door or aiohttp); `error_middleware` answers every error on aiohttp's routes as OpenAI-style JSON.
The app that wires them is `proxy.app`.
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import orjson
from aiohttp import web

from kvblocks import APIError, error_body
from kvblocks.http_errors import bearer_token, json_response

from ..backends.registry import Backend
from ..routing.policies import RequestContext
from ..upstream.sink import ResponseSink
from ..url_hints import not_found_message
from .context import CONTEXT_KEY, ProxyContext
from .openai_request import ParsedRequest, parse_chat, parse_completion
from ..routing.session import session_key

log = logging.getLogger("kvroute.proxy")
_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
MAX_REQUEST_ID = 128
# No cl100k_base token spans more than 128 bytes (so as many characters at most): a text longer than
# this many bytes per token of the context length is too long before it is tokenized.
MAX_CHARS_PER_TOKEN = 128


def error_response(e: APIError) -> web.Response:
    return json_response(e.body(), e.status)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every error leaves as OpenAI-style JSON; a bug answers 500 without a trace."""
    try:
        return await handler(request)
    except APIError as e:
        # kvroute_rejected_total counts refused client requests; an admin call's error is not one.
        if request.app.get(CONTEXT_KEY) is not None and not request.path.startswith("/admin/"):
            request.app[CONTEXT_KEY].metrics.errors.labels(str(e.status)).inc()
        return error_response(e)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONTEXT_KEY].config.max_body_bytes
        return json_response(error_body(413, f"request body too large (limit {limit} bytes)"), 413)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        msg = not_found_message(request.method, request.path, request.host) if e.status == 404 else e.reason
        return json_response(error_body(e.status, msg or "error"), e.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response(error_body(500, "internal proxy error"), 500)


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

    async def start(self, status: int, headers: dict[str, str], content_type: str, charset: str | None,
                    length: int | None = None) -> None:
        resp = web.StreamResponse(status=status, headers=headers)
        if length is not None:
            resp.content_length = length
        resp.content_type = content_type
        if charset:
            resp.charset = charset
        await resp.prepare(self.request)
        self.response = resp

    async def write(self, data: bytes) -> None:
        await self.response.write(data)  # type: ignore[union-attr]

    async def end(self) -> None:
        await self.response.write_eof()  # type: ignore[union-attr]


class ProxyHandlers:
    """The OpenAI-facing routes; parsing happens here, routing in Router, forwarding in Forwarder."""

    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self.config = context.config
        self.router = context.router
        self.admission = context.admission
        self._keys = [k.encode() for k in context.config.api_keys]
        self._rid_prefix = f"kvr-{uuid.uuid4().hex[:12]}-"
        self._rid_counter = itertools.count(1)
        self.body_parser = context.body_parser

    def check_api_key(self, headers: Mapping[str, str]) -> None:
        """401 unless the Bearer token is one of --api-key's (any request passes when none is set)."""
        if not self._keys:
            return
        token = bearer_token(headers).encode("utf-8", "surrogateescape")
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(token, k)
        if not ok:
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", type="AuthenticationError")

    def request_id(self, headers: Mapping[str, str]) -> str:
        """The client's X-Request-ID when it is a plain token (it is forwarded and logged), else a new one."""
        rid = headers.get("x-request-id")
        if rid and len(rid) <= MAX_REQUEST_ID and _REQUEST_ID_CHARS.issuperset(rid):
            return rid
        return f"{self._rid_prefix}{next(self._rid_counter):x}"

    def _check_length(self, parsed: ParsedRequest, ctx: RequestContext | None) -> None:
        """vLLM's context-length rule, applied before a backend is bothered: prompt + max_tokens <= max_model_len.

        With no context yet: only what is certain before any tokenizing (ids counted; a text longer than
        MAX_CHARS_PER_TOKEN UTF-8 bytes per token of the limit). A lazily tokenized prompt estimated at
        under half the room left is let through untokenized: the backend applies the same rule with its
        own tokenizer, which is the authoritative one anyway. Otherwise tokenizing stops once the prompt
        is known to be too long, so the cost is bounded by the limit, not by the body."""
        limit = self.router.max_model_len(parsed.model)
        max_tokens = parsed.max_tokens or 0
        exact = True
        if ctx is None:
            if parsed.token_ids is not None:
                num_tokens = len(parsed.token_ids)
            elif parsed.text is not None and self.router.chunked.enabled and 4 * len(parsed.text) > MAX_CHARS_PER_TOKEN * limit:
                # A token spans at most MAX_CHARS_PER_TOKEN bytes: a lower bound on the count, with no tokenizing.
                size = len(parsed.text)
                if size <= MAX_CHARS_PER_TOKEN * limit:
                    size = len(parsed.text.encode("utf-8", "surrogatepass"))
                num_tokens, exact = size // MAX_CHARS_PER_TOKEN, False
            else:
                return
        else:
            if not ctx.complete:
                if 2 * ctx.num_tokens + max_tokens <= limit:
                    return
                self.router.complete(ctx, stop_at=limit + 1)
            num_tokens, exact = ctx.num_tokens, ctx.complete
        if num_tokens >= limit or num_tokens + max_tokens > limit:
            param = "max_tokens" if num_tokens < limit else ("messages" if parsed.chat else "prompt")
            some = "" if exact else "at least "
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{some}{num_tokens + max_tokens} tokens ({some}{num_tokens} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                param,
            )

    async def read_body(self, request: web.Request) -> bytes:
        """The body of a request aiohttp parsed; 413 beyond --max-body-bytes."""
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise APIError(413, f"request body too large (limit {limit} bytes)")
        return await request.read()

    def _strategy(self, headers: Mapping[str, str]) -> str:
        name = headers.get("x-kvroute-strategy")
        if name is None:
            return self.router.strategy
        return self.router.policy(name.strip()).name

    def _check_model(self, parsed: ParsedRequest) -> None:
        if parsed.model is not None:
            self.check_model_name(parsed.model)

    def check_model_name(self, model: str) -> None:
        """404 (as vLLM answers) when the backends report their models and none serves `model`."""
        known: set[str] = set()
        for b in self.router.registry:
            if b.models:
                known.update(b.models)
        if known and model not in known:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "NotFoundError")

    async def _proxy(self, request: web.Request, path: str, parse) -> web.StreamResponse:
        sink = AiohttpSink(request)
        await self.serve(path, parse, request.headers, lambda: self.read_body(request), sink)
        return sink.response

    async def serve(
        self, path: str, parse: Callable[[bytes], ParsedRequest], headers: Mapping[str, str],
        read_body: Callable[[], Awaitable[bytes]], sink: ResponseSink,
    ) -> None:
        """One OpenAI request, whichever server parsed it; an `APIError` is answered as OpenAI-style JSON
        here (re-raised only if the answer had already started)."""
        try:
            await self._serve(path, parse, headers, read_body, sink)
        except APIError as e:
            if sink.started:
                raise
            self.context.metrics.errors.labels(str(e.status)).inc()
            await sink.send(e.status, {}, orjson.dumps(e.body()), "application/json")

    async def _serve(
        self, path: str, parse: Callable[[bytes], ParsedRequest], headers: Mapping[str, str],
        read_body: Callable[[], Awaitable[bytes]], sink: ResponseSink,
    ) -> None:
        self.check_api_key(headers)
        with self.admission.hold(bearer_token(headers)):
            router = self.router
            strategy = self._strategy(headers)
            raw = await read_body()
            parsed = await self.body_parser.parse(parse, raw, router)
            self._check_model(parsed)
            self._check_length(parsed, None)
            router = self.router
            if parsed.token_ids is not None:
                ctx = router.context(parsed.token_ids, parsed.max_tokens, parsed.model, parsed.cache_salt)
            elif self.context.backend_tokenizer is not None:
                ids = await self._backend_tokens(parsed)
                ctx = router.context(ids, parsed.max_tokens, parsed.model, parsed.cache_salt)
            else:
                ctx = router.text_context(parsed.text, parsed.max_tokens, parsed.model, parsed.cache_salt, strategy=strategy)
            self._check_length(parsed, ctx)
            ctx.session = session_key(headers, self.config.session_header.lower(), parsed.user, self.config.session_user_field)
            await self.context.forwarder.forward(sink, path, raw, ctx, parsed.stream, strategy, self.request_id(headers),
                                         check_tokens=not parsed.multi)

    async def _backend_tokens(self, parsed: ParsedRequest) -> list[int]:
        """`--tokenizer backend`: the ids a healthy backend serving the model computes (its own template for chat)."""
        healthy = self.router.registry.healthy()
        serving = [b for b in healthy if not b.models or parsed.model is None or parsed.model in b.models]
        if not serving:
            raise APIError(503, "no healthy backend available to tokenize the prompt")
        return await self.context.backend_tokenizer.encode(serving[0], parsed.model, parsed.text, parsed.messages)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "/v1/completions", parse_completion)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "/v1/chat/completions", parse_chat)

    async def models(self, request: web.Request) -> web.Response:
        self.check_api_key(request.headers)
        healthy = self.router.registry.healthy()

        async def fetch(b: Backend) -> list[dict]:
            try:
                async with self.context.session.get(b.url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5),
                                                    headers=b.auth_headers, allow_redirects=False) as r:
                    if r.status == 200:
                        data = await r.json(loads=orjson.loads)
                        return [m for m in data.get("data", []) if isinstance(m, dict) and "id" in m]
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, AttributeError):
                pass
            return []

        merged: dict[str, dict] = {}
        for models in await asyncio.gather(*(fetch(b) for b in healthy)):
            for m in models:
                merged.setdefault(m["id"], m)
        return json_response({"object": "list", "data": list(merged.values())})

    async def health(self, request: web.Request) -> web.Response:
        if self.router.registry.healthy():
            return web.Response(status=200)
        return json_response(error_body(503, "no healthy backend"), 503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.context.metrics.exposition()
        if self.router.replicas is not None:  # --workers: the other workers' counters too
            body = await self.router.replicas.local_metrics(body)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
