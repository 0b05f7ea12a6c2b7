"""Sampling the backends' vLLM Prometheus metrics during a run (KV usage, queue, prefix-cache counters).

These are the server's own view: plots of KV usage and queue depth over time, the mean running /
waiting load a report states, and the prefix-cache-hit counter deltas the loadgen's own cached-token
count is checked against.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:prefix_cache_hits": "prefix_hits",
    "vllm:prefix_cache_queries": "prefix_queries",
    "vllm:request_success": "requests",
    "vllm:num_preemptions": "preemptions",
    # The emulator's own fidelity check (absent on real vLLM): how late its engine steps ran, in wall s.
    "kvroute:emulator_step_lateness_seconds_sum": "lateness_sum",
    "kvroute:emulator_step_lateness_seconds_count": "lateness_steps",
}

CACHE_CONFIG = "vllm:cache_config_info"
_PREFIXES = (*GAUGES, CACHE_CONFIG)
DEFAULT_BLOCK_SIZE = 16


@dataclass
class MetricsSample:
    """One scrape of one backend (`t` in wall seconds from the run's start)."""

    t: float
    backend: str
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    prefix_hits: float = 0.0
    prefix_queries: float = 0.0
    requests: float = 0.0
    preemptions: float = 0.0
    lateness_sum: float = 0.0
    lateness_steps: float = 0.0
    block_size: float = 0.0  # from vllm:cache_config_info (0: not reported)

    def to_dict(self) -> dict:
        return asdict(self)


def base_url(url: str) -> str:
    """Server root of a backend URL (drops a trailing /v1)."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def parse_metrics(text: str) -> dict[str, float]:
    """Sum each metric of interest over its label sets (one engine per server in practice).

    Only the sample lines of interest go to the Prometheus parser: a full exposition with its
    histograms takes tens of milliseconds to parse, which would stall the load generator's loop.
    """
    out = {v: 0.0 for v in GAUGES.values()}
    out["block_size"] = 0.0
    wanted = "\n".join(line for line in text.splitlines() if line.startswith(_PREFIXES))
    for fam in text_string_to_metric_families(wanted + "\n"):
        for s in fam.samples:
            if s.name == CACHE_CONFIG:
                try:
                    out["block_size"] = float(s.labels.get("block_size", 0))
                except ValueError:
                    pass
                continue
            key = GAUGES.get(s.name.removesuffix("_total"))
            if key is not None:
                out[key] += s.value
    return out


def reported_block_size(metrics: dict[str, dict[str, float]]) -> int:
    """The backends' KV block size as their vllm:cache_config_info reports it (16 when none does):
    cached tokens become cached blocks by it (real vLLM on CPU runs 32-token blocks)."""
    sizes = {int(m.get("block_size", 0)) for m in metrics.values() if m.get("block_size", 0) > 0}
    return min(sizes) if sizes else DEFAULT_BLOCK_SIZE


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(base_url(url) + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
        r.raise_for_status()
        return parse_metrics(await r.text())


async def scrape_all(urls: list[str]) -> dict[str, dict[str, float]]:
    """One scrape of every backend, keyed by URL (a failed scrape is omitted)."""
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(scrape(session, u) for u in urls), return_exceptions=True)
    return {u: r for u, r in zip(urls, results) if isinstance(r, dict)}


class MetricsSampler:
    """Scrapes every backend every `interval` wall seconds until stopped."""

    def __init__(self, urls: list[str], interval: float = 0.5, on_scrape=None) -> None:
        self.urls = list(urls)
        self.interval = interval
        self.on_scrape = on_scrape  # called with {url: metrics} after every round (the lateness watch)
        self.samples: list[MetricsSample] = []
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    def start(self, run_start: float) -> None:
        if self.urls:
            self._task = asyncio.create_task(self._loop(run_start))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _loop(self, run_start: float) -> None:
        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                results = await asyncio.gather(*(scrape(session, u) for u in self.urls), return_exceptions=True)
                t = time.perf_counter() - run_start
                got = {u: r for u, r in zip(self.urls, results) if isinstance(r, dict)}
                for u, r in got.items():
                    self.samples.append(MetricsSample(t, u, **r))
                if self.on_scrape is not None and got:
                    self.on_scrape(got)
                try:
                    await asyncio.wait_for(self._stop.wait(), self.interval)
                except asyncio.TimeoutError:
                    pass
