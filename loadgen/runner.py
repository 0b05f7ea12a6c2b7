"""Running a workload against a target: arrivals, chains, bounds, progress bar, clean Ctrl-C.

Open-loop arrivals start chains at their emulated times x the time scale (wall s per emulated s); a closed loop
keeps N chains in flight. New requests stop at the request count, the duration bound or Ctrl-C;
on Ctrl-C requests in flight are cancelled and recorded as such, and everything measured is kept.
"""
from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from .arrivals import ConcurrencyArrivals, make_arrivals
from .backend_metrics import MetricsSample, MetricsSampler, scrape_all
from .client import RequestRecord, make_client, send_request
from .config import RunConfig
from .peer import resolve_model
from .validity import LatenessWatch
from .workloads import RequestSpec, Workload


@dataclass
class RunResult:
    """Everything one run measured, plus what is needed to describe it."""

    label: str
    workload: Workload
    config: RunConfig
    arrivals: str
    model: str
    records: list[RequestRecord] = field(default_factory=list)
    samples: list[MetricsSample] = field(default_factory=list)
    metrics_before: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics_after: dict[str, dict[str, float]] = field(default_factory=dict)
    started_at: float = 0.0
    duration: float = 0.0
    interrupted: bool = False
    stopped_by_duration: bool = False
    # Open loop: wall seconds each chain's first request went out after its arrival time.
    dispatch_lateness: list[float] = field(default_factory=list)
    lateness_warnings: list[str] = field(default_factory=list)


class Progress:
    """A tqdm bar showing requests done, rate, errors and the running cache hit rate."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc=label, unit="req", disable=not enabled, dynamic_ncols=True, leave=True)
        self.errors = 0
        self.prompt = 0
        self.cached = 0

    def update(self, rec: RequestRecord) -> None:
        if not rec.ok:
            self.errors += 1
        self.prompt += rec.prompt_tokens
        self.cached += rec.cached_tokens
        hit = self.cached / self.prompt if self.prompt else 0.0
        self.bar.set_postfix_str(f"errors={self.errors} hit={hit:.1%}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


async def discover_model(client: Any) -> str:
    """The first model the target serves; '' when it cannot be asked (requests will then fail and be counted)."""
    try:
        models = await client.models.list()
        return models.data[0].id if models.data else ""
    except Exception:
        return ""


class Runner:
    """Sends one workload once; create one per run."""

    def __init__(self, workload: Workload, config: RunConfig, backends: list[str] | None = None,
                 label: str = "") -> None:
        self.workload = workload
        self.cfg = config
        self.backends = backends or []
        self.label = label or workload.name
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._interrupted = False
        self.records_so_far: list[RequestRecord] = []
        self._clients: list = []
        self._next_client = 0

    def interrupt(self) -> None:
        """Stop issuing requests and cancel those in flight (what Ctrl-C does)."""
        self._interrupted = True
        self._stop.set()
        for t in list(self._tasks):
            t.cancel()

    async def run(self) -> RunResult:
        cfg = self.cfg
        client = make_client(cfg.target, cfg.api_key, cfg.request_timeout)
        # Replicas of one proxy: each request goes to the next (round robin); one client per URL.
        self._clients = [client] + [make_client(u, cfg.api_key, cfg.request_timeout) for u in cfg.targets()[1:]]
        self._next_client = 0
        try:
            model = cfg.model or await resolve_model(await discover_model(client), self.backends) or "default"
        except BaseException:
            for c in self._clients:
                await c.close()
            raise
        arrivals = make_arrivals(self.workload.name, cfg.rate, cfg.concurrency, cfg.workload.seed,
                                 cfg.workload.burst_size)
        result = RunResult(self.label, self.workload, cfg, arrivals.describe(), model)
        self.records_so_far = result.records
        result.metrics_before = await scrape_all(self.backends) if self.backends else {}
        self.watch = LatenessWatch(self.label, cfg.lateness_limit, cfg.time_scale, result.metrics_before, cfg.log_format)
        sampler = MetricsSampler(self.backends, cfg.metrics_interval, self.watch.on_scrape)
        progress = Progress(len(self.workload.requests), self.label, cfg.progress)
        loop = asyncio.get_running_loop()
        sigint = _install_sigint(loop, self.interrupt)
        run_start = time.perf_counter()
        result.started_at = time.time()
        sampler.start(run_start)
        deadline = run_start + cfg.duration if cfg.duration > 0 else None
        try:
            chains = self.workload.chains()
            if isinstance(arrivals, ConcurrencyArrivals):
                await self._closed_loop(chains, arrivals.concurrency, client, model, run_start, deadline, result,
                                        progress)
            else:
                await self._open_loop(chains, arrivals.start_times(chains), client, model, run_start, deadline,
                                      result, progress)
        finally:
            result.duration = time.perf_counter() - run_start
            _remove_sigint(loop, sigint)
            progress.close()
            await sampler.stop()
            for c in self._clients:
                await c.close()
        result.samples = sampler.samples
        result.metrics_after = await scrape_all(self.backends) if self.backends else {}
        self.watch.on_scrape(result.metrics_after, final=True)  # a run too short for the sampler is judged at its end
        result.lateness_warnings = self.watch.warned
        result.interrupted = self._interrupted
        result.stopped_by_duration = deadline is not None and not self._interrupted and \
            len(result.records) < len(self.workload.requests)
        result.records.sort(key=lambda r: r.index)
        return result

    async def _wait(self, seconds: float) -> bool:
        """Sleep `seconds` wall time unless stopped first; True if still running."""
        if seconds > 0:
            try:
                await asyncio.wait_for(self._stop.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        return not self._stop.is_set()

    def _past(self, deadline: float | None) -> bool:
        if deadline is not None and time.perf_counter() >= deadline:
            self._stop.set()
        return self._stop.is_set()

    async def _chain(self, chain: list[RequestSpec], client: Any, model: str, run_start: float,
                     deadline: float | None, result: RunResult, progress: Progress) -> None:
        for k, spec in enumerate(chain):
            if k and spec.think_time and not await self._wait(spec.think_time * self.cfg.time_scale):
                return
            if self._past(deadline):
                return
            try:
                if len(self._clients) > 1:
                    client = self._clients[self._next_client % len(self._clients)]
                    self._next_client += 1
                rec = await send_request(client, model, spec, run_start)
            except asyncio.CancelledError:
                rec = RequestRecord(spec.index, spec.chain, spec.turn, spec.api, time.perf_counter() - run_start,
                                    error="cancelled", expected_prompt_tokens=spec.prompt_tokens,
                                    max_tokens=spec.max_tokens, tags=dict(spec.tags))
                result.records.append(rec)
                progress.update(rec)
                raise
            result.records.append(rec)
            progress.update(rec)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _open_loop(self, chains, starts, client, model, run_start, deadline, result, progress) -> None:
        for chain, st in sorted(zip(chains, starts), key=lambda cs: cs[1]):
            due = run_start + st * self.cfg.time_scale
            if not await self._wait(due - time.perf_counter()) or self._past(deadline):
                break
            late = max(0.0, time.perf_counter() - due)
            result.dispatch_lateness.append(late)
            self.watch.on_dispatch(late)
            self._spawn(self._chain(chain, client, model, run_start, deadline, result, progress))
        await self._drain()

    async def _closed_loop(self, chains, concurrency, client, model, run_start, deadline, result, progress) -> None:
        queue = list(reversed(chains))

        async def worker() -> None:
            while queue and not self._past(deadline):
                await self._chain(queue.pop(), client, model, run_start, deadline, result, progress)

        for _ in range(min(concurrency, len(chains))):
            self._spawn(worker())
        await self._drain()

    async def _drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _install_sigint(loop: asyncio.AbstractEventLoop, handler) -> bool:
    try:
        loop.add_signal_handler(signal.SIGINT, handler)
        return True
    except (NotImplementedError, RuntimeError, ValueError):
        return False


def _remove_sigint(loop: asyncio.AbstractEventLoop, installed: bool) -> None:
    if installed:
        loop.remove_signal_handler(signal.SIGINT)


async def run_workload(workload: Workload, config: RunConfig, backends: list[str] | None = None,
                       label: str = "") -> RunResult:
    """Send `workload` to `config.target` and return what was measured."""
    return await Runner(workload, config, backends, label).run()
