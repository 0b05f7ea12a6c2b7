"""Forwarding one request to the chosen backend: failover before the first byte, streaming after.

Nothing reaches the client until the backend produced its first body byte (streaming) or its whole
body (non-streaming), so a connect error, a 5xx or a timeout up to then is retried on the
next-best backend (`retries` times, with exponential backoff and jitter). Once bytes went out, an
upstream failure ends the SSE stream with an error event and `data: [DONE]`, never a silent cut.
Chunks are written as they arrive (no buffering). Every attempt's outcome feeds the backend's
circuit breaker.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import orjson
from kvblocks import APIError, error_body
from kvblocks.logs import get_logger

from ..backends.registry import Backend, InFlight
from .health import BackendMonitor, note_auth
from ..metrics import ProxyMetrics
from ..routing.policies import Decision, RequestContext
from .settings import ForwardSettings
from .sink import ResponseSink
from ..routing.router import Router
from .client import UpstreamError, UpstreamPool, UpstreamProtocolError, UpstreamResponse
from .usage_check import TAIL_BYTES, PromptTokenCheck  # noqa: F401 - TAIL_BYTES bounds _relay's tail
from ..index.exact_audit import usage_int
from .lora_loader import RuntimeLoraLoader

log = logging.getLogger("kvroute.proxy")

_UPSTREAM_ERRORS = (UpstreamError, TimeoutError, OSError)
# A non-streamed answer up to this size is read whole before anything is sent (so a failure midway is
# still retried elsewhere); a longer one is relayed as it arrives, with memory bounded by this buffer
# and the transports' high-water marks, not by --max-response-bytes.
RELAY_BUFFER = 256 * 1024
# A 5xx answer is read whole to be relayed if no retry succeeds; beyond this it is dropped (502).
MAX_ERROR_BODY = 1024 * 1024


class _Cut(ConnectionResetError):
    """A relayed non-streamed answer failed after its first byte: it cannot be finished, so the client's
    connection is closed (its Content-Length or chunked framing shows the answer incomplete)."""


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Wait before retry number `retry` (1, 2, ...): base x 2^(retry-1), capped, half of it jittered."""
    d = min(cap, base * (2 ** (retry - 1)))
    return d / 2 + (rng or random).uniform(0, d / 2)


class _Failed(Exception):
    """An attempt failed before anything was sent to the client."""

    def __init__(self, reason: str, status: int | None = None, body: bytes | None = None, content_type: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.body = body
        self.content_type = content_type


# Streams still running this long before the shutdown grace ends are ended with an error event.
DRAIN_MARGIN_S = 0.1


def sse_error(status: int, message: str) -> bytes:
    """An SSE error event and [DONE]; the leading blank line ends any event the backend left half-written."""
    return b"\n\ndata: " + orjson.dumps(error_body(status, message)) + b"\n\ndata: [DONE]\n\n"


class Deadline:
    """`asyncio.timeout` on a known loop: the same cancel-and-uncancel semantics, without the three
    `get_running_loop()` calls (each a getpid() syscall on Python 3.11) asyncio's version makes."""

    __slots__ = ("loop", "delay", "task", "handle", "fired")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.fired = False

    async def __aenter__(self) -> Deadline:
        self.task = asyncio.current_task(self.loop)
        self.handle = self.loop.call_later(self.delay, self._fire)
        return self

    def _fire(self) -> None:
        self.fired = True
        self.task.cancel()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self.handle.cancel()
        if self.fired and exc_type is asyncio.CancelledError and self.task.uncancel() == 0:
            raise TimeoutError from exc


class Forwarder:
    def __init__(
        self, router: Router, pool: UpstreamPool, metrics: ProxyMetrics, monitor: BackendMonitor,
        settings: ForwardSettings = ForwardSettings(),
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.router = router
        self.pool = pool
        self.metrics = metrics
        self.monitor = monitor
        self.first_byte_timeout = settings.first_byte_timeout
        self.max_attempts = 1 + settings.retries
        self.backoff = settings.retry_backoff
        self.backoff_max = settings.retry_backoff_max
        # --access-log: one structured line per proxied request (None: off, nothing is formatted).
        self.access = get_logger("proxy.access") if settings.access_log else None
        # Set on SIGTERM: a stream still running when the grace period ends gets an error event, not a cut.
        self.draining = False
        self._streams: set[asyncio.Task] = set()
        self.check_prompt_tokens = PromptTokenCheck(metrics)
        # --lora-runtime-load: adapters are loaded into the chosen backend before the request goes there
        self.lora_loader = RuntimeLoraLoader(monitor.session) if router.settings.lora_runtime_load else None

    async def forward(
        self, sink: ResponseSink, path: str, raw: bytes, ctx: RequestContext, stream: bool, strategy: str, request_id: str,
        check_tokens: bool = True,
    ) -> None:
        """Answer through `sink`: the backend's answer, or an OpenAI-style error raised as `APIError`.

        `check_tokens`: the routing key is the whole prompt, so the backend's usage.prompt_tokens must
        equal our count (False for multi-prompt requests, whose usage sums several prompts)."""
        router = self.router
        t0 = time.perf_counter()
        headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
        tokens = ctx.num_tokens if ctx.complete and check_tokens else None  # to compare with usage.prompt_tokens
        model = router.model_label(ctx.model)
        tried: list[Backend] = []
        last: _Failed | None = None
        for attempt in range(self.max_attempts):
            if attempt and self.backoff:
                await asyncio.sleep(backoff_delay(attempt, self.backoff, self.backoff_max))
            try:
                decision = router.decide(ctx, strategy, tried)
            except APIError:
                if last is None:
                    raise
                break
            b = decision.backend
            if ctx.lora is not None and self.lora_loader is not None and ctx.lora not in b.adapters:
                card = router.adapters.card(ctx.lora, router.registry)
                if card is None or not await self.lora_loader.ensure(b, card):
                    last = _Failed("adapter_load")
                    tried.append(b)
                    continue
            predicted = None if ctx.blind else router.exact_audit.predict(b.url, ctx.hashes)
            rec = router.begin(ctx, decision, strategy, stream)
            probe = b.breaker.attempt()
            verdict = None
            try:
                verdict = await self._attempt(sink, path, raw, {**headers, **b.auth_headers} if b.api_key else headers,
                                              decision, rec, stream, strategy, request_id, t0, tokens, ctx.blind, ctx,
                                              predicted, model)
                return
            except _Failed as f:
                verdict = False
                last = f
                tried.append(b)
                self.metrics.child(self.metrics.requests, strategy, b.url, str(f.status or 502), model).inc()
                if attempt + 1 < self.max_attempts:
                    self.metrics.retries.labels(f.reason).inc()
                    if any(x not in tried for x in router.registry.healthy()):
                        log.warning("request %s: %s on %s; retrying on another backend", request_id, f.reason, b.url)
                    else:
                        log.warning("request %s: %s on %s; no other healthy backend to retry on", request_id, f.reason, b.url)
            finally:
                router.end(rec)
                self._judge(b, probe, verdict)
        assert last is not None
        if self.access is not None:
            self.access.info("request", request_id=request_id, path=path, backend=tried[-1].url if tried else None,
                             strategy=strategy, matched_blocks=None, status=last.status or last.reason,
                             latency_s=round(time.perf_counter() - t0, 6), attempts=len(tried))
        if last.status is not None and last.body is not None:
            await sink.send(last.status, {"x-request-id": request_id, "x-kvroute-strategy": strategy}, last.body,
                            last.content_type or "application/json")
            return
        status = 504 if last.reason == "timeout" else 502
        raise APIError(status, f"backend failed before responding ({last.reason})")

    def _judge(self, b: Backend, probe: bool, verdict: bool | None) -> None:
        """Tell the backend's breaker how the attempt went (None: no verdict, e.g. the client left)."""
        br = b.breaker
        before = br.state
        br.judge(probe, verdict)
        if br.state is not before:
            log.warning("backend %s: circuit breaker %s -> %s", b.url, before.value, br.state.value)

    async def _attempt(
        self, sink: ResponseSink, path: str, raw: bytes, headers: dict[str, str], decision: Decision,
        rec: InFlight, stream: bool, strategy: str, request_id: str, t0: float, tokens: int | None = None,
        blind: bool = False, ctx: RequestContext | None = None, predicted: int | None = None, model: str = "",
    ) -> bool:
        """One try on `decision.backend`: answered (returns whether the backend served it well) or `_Failed`.

        `blind`: the policy did not read the prompt, so no matched-block count is reported."""
        b = decision.backend
        # An event-fed backend's answers are checked against its exact view (index/exact_audit.py).
        audit = (lambda data: self._audit(b, ctx, predicted, data)) if ctx is not None and predicted is not None else None
        upstream: UpstreamResponse | None = None
        done = False
        try:
            try:
                async with Deadline(self.loop, self.first_byte_timeout):
                    upstream = await self.pool.post(b.url, path, raw, headers)
                    if upstream.status >= 500:
                        body = await upstream.read(MAX_ERROR_BODY)
                        raise _Failed(f"status {upstream.status}", upstream.status, body, upstream.content_type)
                    if not stream or upstream.status != 200:
                        body, whole = await upstream.read_some(RELAY_BUFFER)
                        first = None
                    else:
                        first = await upstream.read_chunk()
            except TimeoutError:
                raise _Failed("timeout") from None
            except UpstreamProtocolError as e:
                self.metrics.child(self.metrics.malformed, b.url).inc()
                log.warning("backend %s: malformed answer: %s", b.url, e)
                self.monitor.mark_failure(b, str(e), immediate=False)
                raise _Failed("malformed") from None
            except UpstreamError as e:
                self.monitor.mark_failure(b, str(e), immediate=False)
                raise _Failed("disconnect") from None
            except OSError as e:
                self.monitor.mark_failure(b, f"{type(e).__name__}: {e}", immediate=True)
                raise _Failed("connect") from None
            self.router.first_byte(rec)
            t_first = time.perf_counter()
            m = self.metrics
            m.child(m.ttft, strategy, model).observe(t_first - t0)
            if blind:
                out_headers = {"x-kvroute-backend": b.url, "x-kvroute-strategy": strategy, "x-request-id": request_id}
            else:
                m.child(m.matched, strategy, model).observe(decision.matched_blocks)
                out_headers = {
                    "x-kvroute-backend": b.url,
                    "x-kvroute-strategy": strategy,
                    "x-kvroute-matched-blocks": str(decision.matched_blocks),
                    "x-request-id": request_id,
                }
            status = upstream.status
            ok = True
            if status in (401, 403):  # our credentials, not the client's: a clean 502, no retry elsewhere
                self._auth_refused(b, status)
                body = orjson.dumps(error_body(502, f"backend {b.url}: {b.auth_error}"))
                await sink.send(502, out_headers, body, "application/json")
                ok = False
            elif first is None:
                if whole:
                    await sink.send(status, out_headers, body, upstream.content_type)
                else:
                    body = await self._relay(sink, upstream, body, out_headers, request_id, b)
                if tokens is not None and status == 200:  # a whole body (<= RELAY_BUFFER), or a relayed one's tail
                    self.check_prompt_tokens(b, tokens, body)
                if audit is not None and status == 200:
                    audit(body)
            else:
                ok = await self._stream(sink, upstream, first, out_headers, request_id, b, tokens, audit)
            done = ok
            m.child(m.requests, strategy, b.url, str(status) if ok else "stream_error", model).inc()
            m.child(m.latency, strategy, model).observe(time.perf_counter() - t0)
            if self.access is not None:
                self.access.info("request", request_id=request_id, path=path, backend=b.url, strategy=strategy,
                                 matched_blocks=None if blind else decision.matched_blocks,
                                 status=status if ok else "stream_error",
                                 latency_s=round(time.perf_counter() - t0, 6), stream=stream)
            return ok
        finally:
            if upstream is not None:
                if done:
                    upstream.release()
                else:
                    upstream.close()

    def _auth_refused(self, b: Backend, status: int) -> None:
        note_auth(b, status)
        self.metrics.child(self.metrics.auth_failures, b.url).inc()
        if self.router.registry.set_health(b, False, b.auth_error):
            log.warning("backend %s marked unhealthy: %s", b.url, b.auth_error)

    def _audit(self, b: Backend, ctx: RequestContext, predicted: int, data: bytes) -> None:
        """Hand the answer's usage.prompt_tokens_details.cached_tokens to the exact-view audit."""
        cached = usage_int(data, b"cached_tokens")
        if cached is None:
            return
        r = self.router
        r.exact_audit.observe_answer(b.url, predicted, len(ctx.hashes), ctx.complete, ctx.num_tokens, cached,
                                     ctx.block_size or r.hasher.block_size)

    async def _relay(
        self, sink: ResponseSink, upstream: UpstreamResponse, buffered: bytes, out_headers: dict[str, str], request_id: str,
        b: Backend,
    ) -> bytes:
        """Relay a long non-streamed answer as it arrives; returns its last TAIL_BYTES (where usage is).

        Its Content-Length, when the backend gave one, is passed on; otherwise it goes out chunked."""
        limit = self.pool.max_body
        declared = upstream.headers.get("content-length")
        await sink.start(upstream.status, out_headers, upstream.content_type, upstream.charset,
                         length=int(declared) if declared is not None else None)
        tail = buffered[-TAIL_BYTES:]
        size = len(buffered)
        await sink.write(buffered)
        del buffered
        while True:
            try:
                chunk = await upstream.read_chunk()
            except _UPSTREAM_ERRORS as e:
                if isinstance(e, UpstreamProtocolError):
                    self.metrics.child(self.metrics.malformed, b.url).inc()
                self.metrics.relay_errors.labels("body_cut").inc()
                log.warning("request %s: upstream failed mid-answer after %d bytes: %s", request_id, size, e)
                raise _Cut("backend failed mid-answer") from None
            if not chunk:
                await sink.end()
                return tail
            size += len(chunk)
            if size > limit:
                self.metrics.child(self.metrics.malformed, b.url).inc()
                self.metrics.relay_errors.labels("body_cut").inc()
                log.warning("request %s: backend answer over the %d-byte limit: cut", request_id, limit)
                raise _Cut("backend answer over --max-response-bytes")
            tail = (tail + chunk)[-TAIL_BYTES:] if len(chunk) < TAIL_BYTES else chunk[-TAIL_BYTES:]
            await sink.write(chunk)

    def drain(self, grace: float) -> None:
        """On SIGTERM: let streams run for `grace` seconds, then end each with an error event.

        aiohttp's own shutdown would cancel them only after closing their connections (a silent cut).
        Called again (the front, then aiohttp's shutdown hook), it keeps the first deadline."""
        if self.draining:
            return
        self.draining = True
        self.loop.call_later(max(0.0, grace - DRAIN_MARGIN_S), self._end_streams)

    def _end_streams(self) -> None:
        for task in list(self._streams):
            task.cancel()

    async def _stream(
        self, sink: ResponseSink, upstream: UpstreamResponse, first: bytes, out_headers: dict[str, str], request_id: str,
        b: Backend | None = None, tokens: int | None = None, audit=None,
    ) -> bool:
        """Pass the stream through; False when the backend failed it midway (the client got an error event)."""
        ok = True
        await sink.start(upstream.status, out_headers, upstream.content_type, upstream.charset)
        if first:
            task = asyncio.current_task(self.loop)
            self._streams.add(task)
            try:
                if tokens is not None and b'"prompt_tokens"' in first:
                    self.check_prompt_tokens(b, tokens, first)
                await sink.write(first)
                while True:
                    try:
                        chunk = await upstream.read_chunk()
                        if chunk and tokens is not None and b'"prompt_tokens"' in chunk:  # the usage chunk (stream_options)
                            self.check_prompt_tokens(b, tokens, chunk)
                        if chunk and audit is not None and b'"cached_tokens"' in chunk:
                            audit(chunk)
                    except _UPSTREAM_ERRORS as e:
                        ok = False
                        stalled = isinstance(e, TimeoutError)
                        if isinstance(e, UpstreamProtocolError):
                            self.metrics.child(self.metrics.malformed, upstream.base_url).inc()
                        log.warning("request %s: upstream %s mid-stream: %s", request_id, "stalled" if stalled else "failed", e)
                        msg = ("backend stream stalled (idle timeout)" if stalled else "backend stream malformed"
                               if isinstance(e, UpstreamProtocolError) else "backend stream failed (connection lost)")
                        await sink.write(sse_error(504 if stalled else 502, msg))
                        break
                    except Exception:  # a proxy bug mid-stream: still an error event, [DONE] and the last chunk
                        ok = False
                        self.metrics.relay_errors.labels("stream").inc()
                        log.exception("request %s: proxy error mid-stream", request_id)
                        await sink.write(sse_error(500, "proxy error mid-stream"))
                        break
                    if not chunk:
                        break
                    await sink.write(chunk)
            except asyncio.CancelledError:
                if self.draining:  # cancelled by shutdown, not by the client: end the stream cleanly
                    with contextlib.suppress(Exception):
                        await sink.write(sse_error(503, "proxy shutting down: stream ended after the grace period"))
                        await sink.end()
                raise
            finally:
                self._streams.discard(task)
        await sink.end()
        return ok
