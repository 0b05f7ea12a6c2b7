"""The proxy's aiohttp app: thin OpenAI/admin handlers over `Router` and `Forwarder`.

`create_app(config)` builds the app (client session, monitor and backends come up in its startup
hook); `start_proxy(config)` serves it on the current loop and, when no backend is configured,
first starts embedded emulators on the same loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from kvblocks import APIError, error_body
from kvblocks.http_errors import JSONErrorAppRunner, bearer_token, json_response

from .admin import add_admin_routes
from .admission import Admission
from .backend_tokenizer import BackendTokenizer
from .backends import Backend
from .app_keys import ADMISSION_KEY, METRICS_KEY, ROUTER_KEY, STATE_KEY
from .config import ProxyConfig
from .forward import Forwarder
from .front import FrontServer
from .health import BackendMonitor
from .metrics import ProxyMetrics
from .openai_request import ParsedRequest, parse_chat, parse_completion
from .passthrough import add_passthrough_routes
from .policies import RequestContext
from .response_sink import AiohttpSink, ResponseSink
from .router import BACKEND_TOKENIZER, Router
from .upstream import UpstreamPool

log = logging.getLogger("kvroute.proxy")
_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")
MAX_REQUEST_ID = 128
# No cl100k_base token spans more than 128 bytes (so as many characters at most): a text longer than
# this many bytes per token of the context length is too long before it is tokenized.
MAX_CHARS_PER_TOKEN = 128
# Accept queue: a burst of clients connecting at once is queued, not dropped into SYN retries (1 s each).
LISTEN_BACKLOG = 4096


def error_response(e: APIError) -> web.Response:
    return json_response(e.body(), e.status)


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error leaves as OpenAI-style JSON; a bug answers 500 without a trace."""
    try:
        return await handler(request)
    except APIError as e:
        # kvroute_rejected_total counts refused client requests; an admin call's error is not one.
        if request.app.get(METRICS_KEY) is not None and not request.path.startswith("/admin/"):
            request.app[METRICS_KEY].errors.labels(str(e.status)).inc()
        return error_response(e)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[ROUTER_KEY].config.max_body_bytes
        return json_response(error_body(413, f"request body too large (limit {limit} bytes)"), 413)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return json_response(error_body(e.status, e.reason or "error"), e.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response(error_body(500, "internal proxy error"), 500)


class ProxyHandlers:
    """The OpenAI-facing routes; parsing happens here, routing in Router, forwarding in Forwarder."""

    def __init__(self, app: web.Application, config: ProxyConfig) -> None:
        self.app = app
        self.config = config
        self.router: Router = app[ROUTER_KEY]
        self._keys = [k.encode() for k in config.api_keys]
        self.forwarder: Forwarder | None = None
        self._rid_prefix = f"kvr-{uuid.uuid4().hex[:12]}-"
        self._rid_counter = itertools.count(1)
        self.session: aiohttp.ClientSession | None = None
        self.backend_tokenizer: BackendTokenizer | None = None
        self.admission: Admission = app[ADMISSION_KEY]

    def _check_api_key(self, headers: Mapping[str, str]) -> None:
        if not self._keys:
            return
        token = bearer_token(headers).encode("utf-8", "surrogateescape")
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(token, k)
        if not ok:
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", type="AuthenticationError")

    def _request_id(self, headers: Mapping[str, str]) -> str:
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

    async def _body(self, request: web.Request) -> bytes:
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
            self._check_model_name(parsed.model)

    def _check_model_name(self, model: str) -> None:
        known: set[str] = set()
        for b in self.router.registry:
            if b.models:
                known.update(b.models)
        if known and model not in known:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "NotFoundError")

    async def _proxy(self, request: web.Request, path: str, parse) -> web.StreamResponse:
        sink = AiohttpSink(request)
        await self.serve(path, parse, request.headers, lambda: self._body(request), sink)
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
            self.app[METRICS_KEY].errors.labels(str(e.status)).inc()
            await sink.send(e.status, {}, orjson.dumps(e.body()), "application/json")

    async def _serve(
        self, path: str, parse: Callable[[bytes], ParsedRequest], headers: Mapping[str, str],
        read_body: Callable[[], Awaitable[bytes]], sink: ResponseSink,
    ) -> None:
        self._check_api_key(headers)
        with self.admission.hold(bearer_token(headers)):
            strategy = self._strategy(headers)
            raw = await read_body()
            parsed = parse(raw)
            self._check_model(parsed)
            self._check_length(parsed, None)
            router = self.router
            if parsed.token_ids is not None:
                ctx = router.context(parsed.token_ids, parsed.max_tokens, parsed.model, parsed.cache_salt)
            elif self.backend_tokenizer is not None:
                ids = await self._backend_tokens(parsed)
                ctx = router.context(ids, parsed.max_tokens, parsed.model, parsed.cache_salt)
            else:
                ctx = router.text_context(parsed.text, parsed.max_tokens, parsed.model, parsed.cache_salt)
            self._check_length(parsed, ctx)
            await self.forwarder.forward(sink, path, raw, ctx, parsed.stream, strategy, self._request_id(headers),
                                         check_tokens=not parsed.multi)

    async def _backend_tokens(self, parsed: ParsedRequest) -> list[int]:
        """`--tokenizer backend`: the ids a healthy backend serving the model computes (its own template for chat)."""
        healthy = self.router.registry.healthy()
        serving = [b for b in healthy if not b.models or parsed.model is None or parsed.model in b.models]
        if not serving:
            raise APIError(503, "no healthy backend available to tokenize the prompt")
        return await self.backend_tokenizer.encode(serving[0], parsed.model, parsed.text, parsed.messages)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "/v1/completions", parse_completion)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "/v1/chat/completions", parse_chat)

    async def models(self, request: web.Request) -> web.Response:
        self._check_api_key(request.headers)
        healthy = self.router.registry.healthy()

        async def fetch(b: Backend) -> list[dict]:
            try:
                async with self.session.get(b.url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5),
                                            headers=b.auth_headers) as r:
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
        body = self.app[METRICS_KEY].exposition()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def create_app(config: ProxyConfig) -> web.Application:
    """The proxy app for `config` (backends = config.all_backends(); none is allowed and answers 503)."""
    app = web.Application(middlewares=[_errors], client_max_size=config.max_body_bytes)
    router = Router(config)
    kv_sources = config.kv_event_sources()
    keys = config.backend_api_keys()
    for url in config.all_backends():
        router.add_backend(url, kv_sources.get(url), keys.get(url))
    app[ROUTER_KEY] = router
    app[ADMISSION_KEY] = Admission(config.max_concurrent_per_key)
    app[METRICS_KEY] = ProxyMetrics(router, app[ADMISSION_KEY])
    app[STATE_KEY] = {}
    h = ProxyHandlers(app, config)
    app[STATE_KEY]["handlers"] = h

    async def lifecycle(app: web.Application):
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=True)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",))
        monitor = BackendMonitor(router, session)
        h.session = session
        if config.tokenizer == BACKEND_TOKENIZER:
            h.backend_tokenizer = app[STATE_KEY]["backend_tokenizer"] = BackendTokenizer(session)
        pool = UpstreamPool(config.connect_timeout, config.idle_timeout, max_body=config.max_response_bytes)
        h.forwarder = Forwarder(router, pool, app[METRICS_KEY], monitor)
        app[STATE_KEY].update(session=session, monitor=monitor, pool=pool)
        await monitor.check_all_health()
        monitor.start()
        router.kv_events.start()
        yield
        await router.kv_events.close()
        await monitor.stop()
        pool.close()
        await session.close()

    async def drain(app: web.Application) -> None:
        if h.forwarder is not None:
            h.forwarder.drain(config.shutdown_grace)

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(drain)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_post("/v1/chat/completions", h.chat_completions)
    app.router.add_get("/v1/models", h.models)
    app.router.add_get("/health", h.health)
    app.router.add_get("/metrics", h.metrics)
    add_passthrough_routes(app, h)
    add_admin_routes(app, config, router)
    return app


@dataclass
class RunningProxy:
    """A proxy serving on the current loop; `stop()` also stops its embedded emulators.

    The front door (`front.py`) owns the listening socket and hands what it does not serve to `runner`."""

    url: str
    port: int
    app: web.Application
    runner: web.AppRunner
    front: FrontServer
    addresses: list[tuple[str, int]]
    emulators: list[Any] = field(default_factory=list)

    @property
    def router(self) -> Router:
        return self.app[ROUTER_KEY]

    async def stop(self) -> None:
        """Stop accepting; streams get the shutdown grace, then aiohttp's connections and the app close."""
        grace = self.router.config.shutdown_grace
        forwarder = self.app[STATE_KEY]["handlers"].forwarder
        if forwarder is not None:
            forwarder.drain(grace)
        await self.front.shutdown(grace)
        await self.runner.cleanup()
        for e in self.emulators:
            await e.stop()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def start_embedded_emulators(config: ProxyConfig) -> list[Any]:
    from emulator.config import EmulatorConfig
    from emulator.server import start_emulators

    kwargs: dict[str, Any] = dict(
        host=config.host if config.host not in ("0.0.0.0", "::") else "127.0.0.1",
        port=0,
        profile=config.profile,
        time_scale=config.time_scale,
        block_size=config.block_size,
        prefix_caching_hash_algo=config.hash_algo,
        log_requests=False,
    )
    if config.emulator_model:
        kwargs["model"] = config.emulator_model
    base = EmulatorConfig(**kwargs)
    return list(await start_emulators(base, config.emulators))


async def start_proxy(config: ProxyConfig) -> RunningProxy:
    """Serve the proxy on the current event loop (port 0 = OS-assigned)."""
    emulators: list[Any] = []
    if not config.all_backends():
        emulators = await start_embedded_emulators(config)
        config = dataclasses.replace(config, backends=[e.url for e in emulators], backends_file=None)
    runner = None
    try:
        app = create_app(config)
        runner = JSONErrorAppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=config.shutdown_grace,
            max_line_size=config.max_header_bytes, max_field_size=config.max_header_bytes,
        )
        await runner.setup()
        front = FrontServer(app[STATE_KEY]["handlers"], runner.server, config.max_body_bytes, config.max_header_bytes,
                            config.client_read_timeout)
        addresses = await front.start(config.host, config.port, LISTEN_BACKLOG)
    except BaseException:
        if runner is not None:
            await runner.cleanup()
        for e in emulators:
            await e.stop()
        raise
    port = addresses[0][1]
    if not config.admin_key and not _is_loopback(config.host):
        log.warning("the admin API (/admin/) is open to the network: bound to %s without --admin-key", config.host)
    host = config.host if config.host not in ("0.0.0.0", "::") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return RunningProxy(f"http://{host}:{port}", port, app, runner, front, addresses, emulators)
