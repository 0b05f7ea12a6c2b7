"""Admin API under /admin/: backends, strategy, reset. Guarded by `Authorization: Bearer <admin_key>`.

The load generator switches strategies and resets caches between runs through these routes, so
every answer is JSON and every bad input a 4xx OpenAI-style error.
"""
from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from kvblocks import APIError
from kvblocks.http_errors import json_response

from .admin_auth import AdminGate
from .context import ProxyContext
from ..backends.registry import Backend
from ..config import normalize_url
from ..upstream.health import BackendMonitor
from ..routing.policies import policy_names


# Every backend is health-checked and scraped on a timer: their number is bounded.
MAX_BACKENDS = 256


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise APIError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


class AdminHandlers:
    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self.router = context.router
        self.gate = AdminGate(context.config.admin_key, context.config.host)
        self.runtime_backends = context.config.runtime_backends

    def _guard(self, request: web.Request) -> None:
        self.gate.check(request.headers)

    @property
    def _session(self) -> aiohttp.ClientSession:
        return self.context.session

    @property
    def _monitor(self) -> BackendMonitor:
        return self.context.monitor

    def describe(self) -> list[dict[str, Any]]:
        idx = self.router.index
        out = []
        for b in self.router.registry:
            s = b.scraped
            out.append(
                {
                    "url": b.url,
                    "healthy": b.healthy,
                    "in_flight": b.in_flight,
                    "processed": b.processed,
                    "capacity_blocks": idx.capacity(b.url),
                    "indexed_blocks": idx.num_blocks(b.url),
                    "index_mode": self.router.kv_events.mode(b.url),
                    "exact_audit": self.router.exact_audit.describe(b.url),
                    "adapters": {n: {"path": c.path, "parent": c.parent} for n, c in b.adapters.items()},
                    "models": b.models,
                    "max_model_len": b.max_model_len,
                    "circuit": b.breaker.describe(),
                    "last_error": b.last_error,
                    "scraped": {"running": s.running, "waiting": s.waiting, "kv_cache_usage_perc": s.kv_usage},
                }
            )
        return out

    async def list_backends(self, request: web.Request) -> web.Response:
        self._guard(request)
        out: dict[str, Any] = {"backends": self.describe(), "strategy": self.router.strategy}
        if self.router.replicas is not None:
            out["replicas"] = self.router.replicas.status()
        return json_response(out)

    async def _url(self, request: web.Request) -> str:
        url = request.query.get("url")
        if url is None:
            url = (await _json_body(request)).get("url")
        if not isinstance(url, str) or not url.strip():
            raise APIError(400, "url (string) is required", "url")
        try:  # the same rule as a configured --backend: scheme, host, port, a plain path prefix
            return normalize_url(url)
        except ValueError as e:
            raise APIError(400, str(e).removeprefix("backends: "), "url") from None

    async def add_backend(self, request: web.Request) -> web.Response:
        self._guard(request)
        if not self.runtime_backends:
            raise APIError(403, "adding backends at run time is disabled (--no-runtime-backends)", "url",
                           "PermissionDeniedError")
        url = await self._url(request)
        if url not in self.router.registry and len(self.router.registry) >= MAX_BACKENDS:
            raise APIError(400, f"at most {MAX_BACKENDS} backends", "url")
        b, created = self.router.add_backend(url)
        if created:
            if self.router.replicas is not None:
                self.router.replicas.backend_added(url)
            await self._monitor.check_health(b)
            await self._monitor.scrape(b)
        return json_response({"backend": url, "created": created, "healthy": b.healthy}, 201 if created else 200)

    async def remove_backend(self, request: web.Request) -> web.Response:
        self._guard(request)
        url = await self._url(request)
        if self.router.remove_backend(url) is None:
            raise APIError(404, f"unknown backend {url!r}", "url", "NotFoundError")
        if self.router.replicas is not None:
            self.router.replicas.backend_removed(url)
        self.context.pool.close_origin(url)
        return json_response({"removed": url})

    async def get_strategy(self, request: web.Request) -> web.Response:
        self._guard(request)
        return json_response({"strategy": self.router.strategy, "available": policy_names()})

    async def put_strategy(self, request: web.Request) -> web.Response:
        self._guard(request)
        name = (await _json_body(request)).get("strategy")
        strategy = self.router.set_strategy(name)
        if self.router.replicas is not None:
            self.router.replicas.strategy(strategy)
        return json_response({"strategy": strategy})

    async def reset(self, request: web.Request) -> web.Response:
        """Clear the prefix index and every backend's prefix cache (POST /reset_prefix_cache)."""
        self._guard(request)
        self.router.reset()
        if self.router.replicas is not None:
            self.router.replicas.reset()
        timeout = aiohttp.ClientTimeout(total=10)

        async def reset_one(b: Backend) -> dict[str, Any]:
            """vLLM answers 200 {"success": false} while blocks are held (running requests): not a reset."""
            try:
                async with self._session.post(b.url + "/reset_prefix_cache", timeout=timeout, headers=b.auth_headers,
                                              allow_redirects=False) as r:
                    body = await r.read()
                    ok = 200 <= r.status < 300
                    if ok and body:
                        try:
                            ok = orjson.loads(body).get("success", True) is not False
                        except (orjson.JSONDecodeError, AttributeError):
                            pass
                    return {"ok": ok, "status": r.status}
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                return {"ok": False, "status": None, "error": f"{type(e).__name__}: {e}"}

        backends = list(self.router.registry)
        results = await asyncio.gather(*(reset_one(b) for b in backends))
        per = dict(zip([b.url for b in backends], results))
        return json_response({"index_cleared": True, "ok": all(r["ok"] for r in results), "backends": per})


def add_admin_routes(app: web.Application, context: ProxyContext) -> None:
    h = AdminHandlers(context)
    h.gate.warn_at_start()
    app.router.add_get("/admin/backends", h.list_backends)
    app.router.add_post("/admin/backends", h.add_backend)
    app.router.add_delete("/admin/backends", h.remove_backend)
    app.router.add_get("/admin/strategy", h.get_strategy)
    app.router.add_put("/admin/strategy", h.put_strategy)
    app.router.add_post("/admin/reset", h.reset)
