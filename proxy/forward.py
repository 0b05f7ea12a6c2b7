"""Forwarding one request to the chosen backend: failover before the first byte, streaming after.

Nothing reaches the client until the backend produced its first body byte (streaming) or its whole
body (non-streaming), so a connect error, a 5xx or a timeout up to then is retried once on the
next-best backend. Once bytes went out, an upstream failure ends the SSE stream with an error
event and `data: [DONE]`, never a silent cut. Chunks are written as they arrive (no buffering).
"""
from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiohttp import web

from kvblocks import APIError, error_body

from .backends import Backend, InFlight
from .health import BackendMonitor
from .metrics import ProxyMetrics
from .policies import Decision, RequestContext
from .router import Router
from .upstream import UpstreamError, UpstreamPool, UpstreamResponse

log = logging.getLogger("kvroute.proxy")

_UPSTREAM_ERRORS = (UpstreamError, TimeoutError, OSError)
MAX_ATTEMPTS = 2


class _Failed(Exception):
    """An attempt failed before anything was sent to the client."""

    def __init__(self, reason: str, status: int | None = None, body: bytes | None = None, content_type: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.body = body
        self.content_type = content_type


class Forwarder:
    def __init__(self, router: Router, pool: UpstreamPool, metrics: ProxyMetrics, monitor: BackendMonitor) -> None:
        self.router = router
        self.pool = pool
        self.metrics = metrics
        self.monitor = monitor
        self.first_byte_timeout = router.config.first_byte_timeout

    async def forward(
        self, request: web.Request, path: str, raw: bytes, ctx: RequestContext, stream: bool, strategy: str, request_id: str
    ) -> web.StreamResponse:
        router = self.router
        t0 = time.perf_counter()
        headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
        tried: list[Backend] = []
        last: _Failed | None = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                decision = router.decide(ctx, strategy, tried)
            except APIError:
                if last is None:
                    raise
                break
            rec = router.begin(ctx, decision, strategy)
            try:
                return await self._attempt(request, path, raw, headers, decision, rec, stream, strategy, request_id, t0)
            except _Failed as f:
                last = f
                tried.append(decision.backend)
                self.metrics.child(self.metrics.requests, strategy, decision.backend.url, str(f.status or 502)).inc()
                if attempt + 1 < MAX_ATTEMPTS:
                    self.metrics.retries.labels(f.reason).inc()
                    log.warning("request %s: %s on %s; retrying elsewhere", request_id, f.reason, decision.backend.url)
            finally:
                router.end(rec)
        assert last is not None
        if last.status is not None and last.body is not None:
            return web.Response(body=last.body, status=last.status, content_type=last.content_type or "application/json",
                                headers={"x-request-id": request_id, "x-kvroute-strategy": strategy})
        status = 504 if last.reason == "timeout" else 502
        raise APIError(status, f"backend failed before responding ({last.reason})")

    async def _attempt(
        self, request: web.Request, path: str, raw: bytes, headers: dict[str, str], decision: Decision,
        rec: InFlight, stream: bool, strategy: str, request_id: str, t0: float,
    ) -> web.StreamResponse:
        b = decision.backend
        upstream: UpstreamResponse | None = None
        done = False
        try:
            try:
                async with asyncio.timeout(self.first_byte_timeout):
                    upstream = await self.pool.post(b.url, path, raw, headers)
                    if upstream.status >= 500 or not stream or upstream.status != 200:
                        body = await upstream.read()
                        if upstream.status >= 500:
                            raise _Failed(f"status {upstream.status}", upstream.status, body, upstream.content_type)
                        first = None
                    else:
                        first = await upstream.read_chunk()
            except TimeoutError:
                raise _Failed("timeout") from None
            except UpstreamError as e:
                self.monitor.mark_failure(b, str(e), immediate=False)
                raise _Failed("disconnect") from None
            except OSError as e:
                self.monitor.mark_failure(b, f"{type(e).__name__}: {e}", immediate=True)
                raise _Failed("connect") from None
            Router.first_byte(rec)
            t_first = time.perf_counter()
            m = self.metrics
            m.child(m.ttft, strategy).observe(t_first - t0)
            m.child(m.matched, strategy).observe(decision.matched_blocks)
            out_headers = {
                "x-kvroute-backend": b.url,
                "x-kvroute-strategy": strategy,
                "x-kvroute-matched-blocks": str(decision.matched_blocks),
                "x-request-id": request_id,
            }
            status = upstream.status
            if first is None:
                resp = web.Response(body=body, status=status, headers=out_headers, content_type=upstream.content_type)
                done = True
            else:
                resp = await self._stream(request, upstream, first, out_headers, request_id)
                done = True
            m.child(m.requests, strategy, b.url, str(status)).inc()
            m.child(m.latency, strategy).observe(time.perf_counter() - t0)
            return resp
        finally:
            if upstream is not None:
                if done:
                    upstream.release()
                else:
                    upstream.close()

    async def _stream(
        self, request: web.Request, upstream: UpstreamResponse, first: bytes, out_headers: dict[str, str], request_id: str
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, headers=out_headers)
        resp.content_type = upstream.content_type
        if upstream.charset:
            resp.charset = upstream.charset
        await resp.prepare(request)
        if first:
            await resp.write(first)
            while True:
                try:
                    chunk = await upstream.read_chunk()
                except _UPSTREAM_ERRORS as e:
                    log.warning("request %s: upstream failed mid-stream: %s", request_id, e)
                    err = error_body(502, f"backend stream failed: {type(e).__name__}")
                    # The blank line first ends any event the backend left half-written.
                    await resp.write(b"\n\ndata: " + orjson.dumps(err) + b"\n\ndata: [DONE]\n\n")
                    break
                if not chunk:
                    break
                await resp.write(chunk)
        await resp.write_eof()
        return resp
