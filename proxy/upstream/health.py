"""Background health checks and metric scrapes of every backend.

GET /health marks a backend unhealthy after `unhealthy_after` failures in a row (a connect error
while forwarding marks it at once) and healthy again on the first success; GET /metrics feeds the
scraped load and the index capacity (vllm:cache_config_info num_gpu_blocks); GET /v1/models the
served models and their max_model_len (the proxy's prompt-length limit).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import aiohttp
import orjson

from ..backends.registry import Backend, now
from ..routing.router import Router
from ..url_hints import backend_url_hint
from .settings import MonitorSettings
from ..routing.adapters import parse_model_cards

log = logging.getLogger("kvroute.proxy")

# Bounds on what a backend's monitoring answers may hold (they are read whole).
MAX_METRICS_BYTES = 8 * 1024 * 1024
MAX_MODELS_BYTES = 4 * 1024 * 1024
MAX_GAUGE = 1e9
MAX_COUNTER = 1e18  # token counters of a long-lived server outgrow MAX_GAUGE
MAX_TIMESTAMP = 1e11  # vllm:lora_requests_info's value: a Unix time
MAX_BLOCKS = float(1 << 31)
_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
}
# Counters the exact-view audit reads (index/exact_audit.py): tokens looked up / found, requests done.
_COUNTERS = {
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:request_success_total": "finished",
}


_SAMPLE = re.compile(r'^([a-zA-Z_:][\w:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_vllm_metrics(text: str) -> dict[str, float | str]:
    """The few vLLM series routing uses, summed over engines; cache_config_info's sizes and hash algorithm.

    Label values are quoted strings that may hold commas, braces or `=` (vLLM's cache_config_info
    carries every CacheConfig field as a label), so samples are parsed as the exposition format
    defines them, not split on separators."""
    out: dict[str, float | str] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        if name in _GAUGES:
            v = _sane(value, MAX_GAUGE)
            if v is not None:
                out[_GAUGES[name]] = out.get(_GAUGES[name], 0.0) + v
        elif name in _COUNTERS:
            v = _sane(value, MAX_COUNTER)
            if v is not None:
                out[_COUNTERS[name]] = out.get(_COUNTERS[name], 0.0) + v
        elif name == "vllm:lora_requests_info":
            # A label set once seen stays exposed with the time it was last current: keep the newest.
            t = _sane(value, MAX_TIMESTAMP)
            if t is not None and t >= out.get("_lora_t", -1.0):
                out["_lora_t"] = t
                out["lora_info"] = dict(_LABEL.findall(labels))  # type: ignore[assignment]
        elif name == "vllm:cache_config_info":
            for k, v in _LABEL.findall(labels):
                if k in ("num_gpu_blocks", "block_size"):
                    x = _sane(v, MAX_BLOCKS)
                    if x is not None and x >= 1 and x == int(x):
                        out[k] = x
                elif k == "prefix_caching_hash_algo" and v:
                    out["hash_algo"] = v
    return out


def _sane(text: str, limit: float) -> float | None:
    """A backend's number, or None when it is not one, not finite, negative or absurd (it is input too:
    int(float('inf')) raises, a block size of 1e18 would wreck routing)."""
    if len(text) > 32:
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if 0 <= v <= limit else None  # NaN fails both comparisons


async def _bounded(r: aiohttp.ClientResponse, limit: int) -> bytes:
    body = await r.content.read(limit + 1)
    if len(body) > limit:
        raise ValueError(f"answer over {limit} bytes")
    return body


def auth_failure(b: Backend, status: int) -> str:
    return (f"backend rejected the proxy's credentials (HTTP {status}): "
            + ("its API key is wrong" if b.api_key else "it needs an API key") + " (--backend-api-key, or api_key in the backends file)")


def note_auth(b: Backend, status: int) -> None:
    """Track whether `b` accepts our credentials, from the status of a request to a guarded path."""
    if status in (401, 403):
        b.auth_error = auth_failure(b, status)
    elif status < 400 and b.auth_error is not None:
        log.info("backend %s accepts the proxy's credentials again", b.url)
        b.auth_error = None


class BackendMonitor:
    """Runs the periodic checks on the proxy's event loop."""

    def __init__(
        self, router: Router, session: aiohttp.ClientSession, settings: MonitorSettings = MonitorSettings(),
    ) -> None:
        self.router = router
        self.session = session
        self.health_interval = settings.health_interval
        self.metrics_interval = settings.metrics_interval
        self.unhealthy_after = max(1, settings.unhealthy_after)
        self.timeout = aiohttp.ClientTimeout(total=max(0.5, min(5.0, settings.health_interval)))
        self._tasks: list[asyncio.Task] = []
        self._no_metrics_logged: set[str] = set()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(self.check_all_health, self.health_interval)),
            asyncio.create_task(self._loop(self.scrape_all, self.metrics_interval)),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    @staticmethod
    async def _loop(fn, interval: float) -> None:
        while True:
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:  # a monitoring bug must not stop monitoring
                log.exception("backend monitor step failed")
            await asyncio.sleep(interval)

    async def check_all_health(self) -> None:
        backends = list(self.router.registry)
        if backends:
            await asyncio.gather(*(self.check_health(b) for b in backends))

    async def scrape_all(self) -> None:
        backends = [b for b in self.router.registry if b.healthy]
        if backends:
            await asyncio.gather(*(self.scrape(b) for b in backends))

    async def check_health(self, b: Backend) -> bool:
        try:
            async with self.session.get(b.url + "/health", timeout=self.timeout, headers=b.auth_headers,
                                        allow_redirects=False) as r:
                ok = r.status == 200
                err = None if ok else f"/health answered {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            ok, err = False, f"{type(e).__name__}: {e}"
        if ok:
            # vLLM's /health needs no key but /v1/* does: a wrong key shows here, and keeps it out of routing.
            # Read at every check: adapters come and go at run time (/v1/load_lora_adapter).
            await self.fetch_models(b)
            if b.auth_error:
                ok, err = False, b.auth_error
        if err is not None:
            err += backend_url_hint(b.url)
        if ok:
            if self.router.registry.set_health(b, True):
                log.info("backend %s is healthy again", b.url)
        elif b.auth_error:
            if self.router.registry.set_health(b, False, err):
                log.warning("backend %s marked unhealthy: %s", b.url, err)
        else:
            # A backend that never answered yet (just added, or down at startup) gets no traffic at once.
            self.mark_failure(b, err, immediate=b.models is None)
        return ok

    def mark_failure(self, b: Backend, error: str | None, immediate: bool) -> None:
        if b.url not in self.router.registry:
            return
        reg = self.router.registry
        if immediate or b.failures + 1 >= self.unhealthy_after:
            if reg.set_health(b, False, error):
                log.warning("backend %s marked unhealthy: %s", b.url, error)
        else:
            b.failures += 1
            b.last_error = error

    async def fetch_models(self, b: Backend) -> None:
        try:
            async with self.session.get(b.url + "/v1/models", timeout=self.timeout, headers=b.auth_headers,
                                        allow_redirects=False) as r:
                note_auth(b, r.status)
                if r.status == 200:
                    data = orjson.loads(await _bounded(r, MAX_MODELS_BYTES))
                    entries = [m for m in data.get("data", []) if isinstance(m, dict) and "id" in m]
                    b.models, b.adapters = parse_model_cards(entries)
                    lens = [m["max_model_len"] for m in entries if isinstance(m.get("max_model_len"), int)]
                    b.max_model_len = max(lens) if lens else None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError, TypeError, AttributeError):
            pass

    async def scrape(self, b: Backend) -> None:
        mark = b.scrape_mark()
        try:
            async with self.session.get(b.url + "/metrics", timeout=self.timeout, headers=b.auth_headers,
                                        allow_redirects=False) as r:
                if r.status != 200:
                    return
                text = (await _bounded(r, MAX_METRICS_BYTES)).decode("utf-8")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, UnicodeDecodeError, ValueError):
            return
        vals = parse_vllm_metrics(text)
        if not vals and b.url not in self._no_metrics_logged:
            self._no_metrics_logged.add(b.url)  # once per backend
            log.warning("backend %s: /metrics has no vllm:num_requests_* / vllm:cache_config_info series (a vLLM "
                        "started with --disable-log-stats?): load and block size are not read from it", b.url)
        b.note_scrape(vals.get("running"), vals.get("waiting"), vals.get("kv_usage"), now(), since=mark)
        s = b.scraped
        lora = vals.get("lora_info")
        if isinstance(lora, dict):
            with contextlib.suppress(ValueError):
                s.max_loras = int(lora.get("max_lora", ""))
            s.active_loras = frozenset(x for k in ("running_lora_adapters", "waiting_lora_adapters")
                                       for x in lora.get(k, "").split(",") if x)
        if "prefix_queries" in vals and "prefix_hits" in vals and "finished" in vals:
            self.router.exact_audit.observe_counters(
                b.url, vals["prefix_queries"], vals["prefix_hits"], vals["finished"],
                b.scraped.block_size or self.router.hasher.block_size,
                unfinished=vals.get("running", 0.0) + vals.get("waiting", 0.0))
        if "block_size" in vals or "hash_algo" in vals:
            if "block_size" in vals:
                s.block_size = int(vals["block_size"])
            s.hash_algo = vals.get("hash_algo", s.hash_algo)
            self.router.follow_block_hashing()
        if "num_gpu_blocks" in vals:
            blocks = int(vals["num_gpu_blocks"])
            if blocks != s.num_gpu_blocks:
                s.num_gpu_blocks = blocks
                if b.url in self.router.registry:
                    # vLLM's num_gpu_blocks includes the null block, which never caches anything.
                    self.router.index.set_capacity(b.url, max(1, blocks - 1))
