"""Wiring: the proxy's parts built from one `ProxyConfig`, served on the current loop.

`create_app(config)` builds the aiohttp app (client session, monitor and backends come up in its
startup hook); `start_proxy(config)` serves it behind the front door over the backends it is given
(none is allowed: every request answers 503). Embedded emulators are the launcher's business
(`python -m proxy`, `proxy.__main__`), not the proxy's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from kvblocks.http_errors import JSONErrorAppRunner

from .edge.admin import add_admin_routes
from .edge.admission import Admission
from .edge.body_parse import BodyParser
from .edge.context import CONTEXT_KEY, ProxyContext
from .upstream.tokenizer import BackendTokenizer
from .backends.registry import BackendRegistry
from .config import ProxyConfig
from .edge.handlers import ProxyHandlers, error_middleware
from .upstream.forward import Forwarder
from .edge.front import FrontServer
from .upstream.health import BackendMonitor
from .metrics import ProxyMetrics
from .edge.passthrough import add_passthrough_routes
from .routing.router import Router
from .routing.settings import BACKEND_TOKENIZER
from .upstream.client import UpstreamPool

log = logging.getLogger("kvroute.proxy")
# Accept queue: a burst of clients connecting at once is queued, not dropped into SYN retries (1 s each).
LISTEN_BACKLOG = 4096


def create_app(config: ProxyConfig) -> web.Application:
    """The proxy app for `config` (backends = config.all_backends(); none is allowed and answers 503)."""
    return _build(config)[0]


def _build(config: ProxyConfig) -> tuple[web.Application, ProxyHandlers]:
    """The aiohttp app and the handlers it routes to (which the front door serves through too)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_body_bytes)
    router = Router(config.routing(), BackendRegistry(config.new_breaker))
    kv_sources = config.kv_event_sources()
    keys = config.backend_api_keys()
    for url in config.all_backends():
        router.add_backend(url, kv_sources.get(url), keys.get(url))
    admission = Admission(config.max_concurrent_per_key)
    context = ProxyContext(config, router, admission, ProxyMetrics(router, admission), BodyParser())
    app[CONTEXT_KEY] = context
    h = ProxyHandlers(context)

    async def lifecycle(app: web.Application):
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=True)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",))
        monitor = BackendMonitor(router, session, config.monitoring())
        pool = UpstreamPool(config.connect_timeout, config.idle_timeout, max_body=config.max_response_bytes)
        context.session, context.monitor, context.pool = session, monitor, pool
        if config.tokenizer == BACKEND_TOKENIZER:
            context.backend_tokenizer = BackendTokenizer(session)
        context.forwarder = Forwarder(router, pool, context.metrics, monitor, config.forwarding())
        await monitor.check_all_health()
        monitor.start()
        router.kv_events.start()
        replicas = None
        if config.replica_bind_address():
            from .replicas.sync import ReplicaSync

            replicas = ReplicaSync(router, config.replica_bind_address(), config.peers, config.replica_heartbeat,
                                   metrics=context.metrics.exposition)
            await replicas.start()
        context.replicas = replicas
        yield
        if replicas is not None:
            await replicas.close()
        await router.kv_events.close()
        await monitor.stop()
        pool.close()
        await session.close()

    async def drain(app: web.Application) -> None:
        if context.forwarder is not None:
            context.forwarder.drain(config.shutdown_grace)

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(drain)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_post("/v1/chat/completions", h.chat_completions)
    app.router.add_get("/v1/models", h.models)
    app.router.add_get("/health", h.health)
    app.router.add_get("/metrics", h.metrics)
    add_passthrough_routes(app, h)
    add_admin_routes(app, context)
    return app, h


@dataclass
class RunningProxy:
    """A proxy serving on the current loop; `stop()` also stops `emulators`, the peers a launcher
    started with it (embedded emulators; anything with an async `stop()`), after the proxy.

    The front door (`front.py`) owns the listening socket and hands what it does not serve to `runner`."""

    url: str
    port: int
    app: web.Application
    runner: web.AppRunner
    front: FrontServer
    addresses: list[tuple[str, int]]
    emulators: list[Any] = field(default_factory=list)

    @property
    def context(self) -> ProxyContext:
        """The proxy's parts (config, router, metrics, admission, and once started session, pool, monitor, ...)."""
        return self.app[CONTEXT_KEY]

    @property
    def router(self) -> Router:
        return self.app[CONTEXT_KEY].router

    async def stop(self) -> None:
        """Stop accepting; streams get the shutdown grace, then aiohttp's connections and the app close."""
        context = self.context
        if context.forwarder is not None:
            context.forwarder.drain(context.config.shutdown_grace)
        grace = context.config.shutdown_grace
        await self.front.shutdown(grace)
        await self.runner.cleanup()
        await context.body_parser.close()
        for e in self.emulators:
            await e.stop()


async def start_proxy(config: ProxyConfig) -> RunningProxy:
    """Serve the proxy on the current event loop (port 0 = OS-assigned) over `config`'s backends."""
    runner = None
    try:
        app, handlers = _build(config)
        runner = JSONErrorAppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=config.shutdown_grace,
            max_line_size=config.max_header_bytes, max_field_size=config.max_header_bytes,
            keepalive_timeout=config.client_keepalive_timeout,
        )
        await runner.setup()
        rejected = app[CONTEXT_KEY].metrics.errors
        front = FrontServer(handlers, runner.server, config.max_body_bytes, config.max_header_bytes,
                            config.client_read_timeout, on_reject=lambda status: rejected.labels(str(status)).inc(),
                            keepalive_s=config.client_keepalive_timeout,
                            session_header=config.session_header)
        addresses = await front.start(config.host, config.port, LISTEN_BACKLOG, config.reuse_port)
    except BaseException:
        if runner is not None:
            await runner.cleanup()
        raise
    port = addresses[0][1]
    host = config.host if config.host not in ("0.0.0.0", "::") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return RunningProxy(f"http://{host}:{port}", port, app, runner, front, addresses)
