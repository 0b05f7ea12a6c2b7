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

import aiohttp

from .backends import Backend, now
from .router import Router

log = logging.getLogger("kvroute.proxy")

_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
}


def parse_vllm_metrics(text: str) -> dict[str, float | str]:
    """The few vLLM series routing uses, summed over engines; cache_config_info's sizes and hash algorithm."""
    out: dict[str, float | str] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name, _, rest = line.partition("{")
        if not rest:
            name, _, value = line.partition(" ")
            labels = ""
        else:
            labels, _, value = rest.rpartition("}")
        name = name.strip()
        if name in _GAUGES:
            try:
                out[_GAUGES[name]] = out.get(_GAUGES[name], 0.0) + float(value.split()[0])
            except (ValueError, IndexError):
                continue
        elif name == "vllm:cache_config_info":
            for part in labels.split(","):
                k, _, v = part.partition("=")
                k = k.strip()
                v = v.strip().strip('"')
                if k in ("num_gpu_blocks", "block_size"):
                    with contextlib.suppress(ValueError):
                        out[k] = float(v)
                elif k == "prefix_caching_hash_algo" and v:
                    out["hash_algo"] = v
    return out


class BackendMonitor:
    """Runs the periodic checks on the proxy's event loop."""

    def __init__(self, router: Router, session: aiohttp.ClientSession) -> None:
        self.router = router
        self.session = session
        cfg = router.config
        self.health_interval = cfg.health_interval
        self.metrics_interval = cfg.metrics_interval
        self.unhealthy_after = max(1, cfg.unhealthy_after)
        self.timeout = aiohttp.ClientTimeout(total=max(0.5, min(5.0, cfg.health_interval)))
        self._tasks: list[asyncio.Task] = []

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
            async with self.session.get(b.url + "/health", timeout=self.timeout) as r:
                ok = r.status == 200
                err = None if ok else f"/health answered {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            ok, err = False, f"{type(e).__name__}: {e}"
        if ok:
            if self.router.registry.set_health(b, True):
                log.info("backend %s is healthy again", b.url)
            if b.models is None:
                await self.fetch_models(b)
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
            async with self.session.get(b.url + "/v1/models", timeout=self.timeout) as r:
                if r.status == 200:
                    data = await r.json()
                    entries = [m for m in data.get("data", []) if isinstance(m, dict) and "id" in m]
                    b.models = [m["id"] for m in entries]
                    lens = [m["max_model_len"] for m in entries if isinstance(m.get("max_model_len"), int)]
                    b.max_model_len = max(lens) if lens else None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError, TypeError):
            pass

    async def scrape(self, b: Backend) -> None:
        try:
            async with self.session.get(b.url + "/metrics", timeout=self.timeout) as r:
                if r.status != 200:
                    return
                text = await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, UnicodeDecodeError):
            return
        vals = parse_vllm_metrics(text)
        b.note_scrape(vals.get("running"), vals.get("waiting"), vals.get("kv_usage"), now())
        s = b.scraped
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
